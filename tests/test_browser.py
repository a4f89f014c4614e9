"""The JupyterLab path in a real browser: the explorer's Generate and Compare buttons.

Starts JupyterLab on 127.0.0.1 (random port and token, its own config and workspace folders)
with the project's ``python3`` kernel, opens a notebook made of notebook 03's explorer cells on
a smoke run prepared in the test's folder, and drives headless Chromium with Selenium: Generate
must draw images, Compare (with a label picked and the nearest training images ticked) must
draw the taller comparison, and no cell may write to stderr. Screenshots go to the test's
temporary folder; with ``CXRLIB_EXPLORER_SCREENSHOT=<path>`` the comparison screenshot is also
copied there, and with ``CXRLIB_EXPLORER_PARAMS=params/demo.yaml`` the explorer runs on that
finished run's generator (how ``reports/explorer.png`` is made from the demo's). Skips where
Chromium, chromedriver or Selenium are missing: ``apt-get install chromium chromium-driver``,
``pip install selenium``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from cxrlib.core.config import load_params, params_base, resolve_path
from cxrlib.core.layout import RUNS_DIR_ENV, RunLayout
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import prepare_cohort
from cxrlib.diffusion.training import train_diffusion

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: A parameter file whose run has finished notebook 02: the explorer is built on its
#: generator instead of a 4-step smoke model (how ``reports/explorer.png`` is made from the
#: demo's generator).
EXPLORER_PARAMS = "CXRLIB_EXPLORER_PARAMS"
STARTUP_S = 120  # JupyterLab up, page loaded, kernel started and torch imported
BUTTON = "//button[contains(@class, 'widget-button') and normalize-space()='{}']"
OUTPUT_IMAGE = "//div[contains(@class, 'widget-output')]//img"
STDERR = "[data-mime-type='application/vnd.jupyter.stderr']"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver on PATH (Debian: apt-get install chromium "
           "chromium-driver); the JupyterLab browser test needs both")


def _explorer_notebook(params_file: Path) -> nbformat.NotebookNode:
    """Notebook 03's parameters, loading and explorer cells (not the cohorts or the audit)."""
    source = nbformat.read(ROOT / "notebooks" / "03_sampling_explorer.ipynb", as_version=4)
    code = [c for c in source.cells if c.cell_type == "code"]
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    load = next(c for c in code if "from_checkpoint(" in c.source)
    build = next(c for c in code if "SamplingExplorer(" in c.source)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (cxrlib)",
                                 "language": "python"}
    # the notebook's own parameters (every one it reads), then this test's values, as
    # papermill would inject them
    nb.cells = [nbformat.v4.new_code_cell(f"{parameters.source}\n"
                                          f"params_file = {str(params_file)!r}\n"
                                          "progress = False"),
                nbformat.v4.new_code_cell(load.source), nbformat.v4.new_code_cell(build.source)]
    return nb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET") -> object:
    req = urllib.request.Request(f"{base}{path}", method=method,
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """A smoke run (cohort and 4-step diffusion model) and JupyterLab serving a notebook that
    builds the explorer on it; yields (base URL, token, folder). Stops the server itself."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e .[dev])")
    folder = tmp_path_factory.mktemp("lab")
    runs = folder / "runs"
    params_file = ROOT / "params" / "smoke.yaml"
    if os.environ.get(EXPLORER_PARAMS):  # a finished run's generator, e.g. the demo's
        params_file = Path(os.environ[EXPLORER_PARAMS]).resolve()
        params = load_params(params_file)  # its own run folder, not the tests' scratch one
        runs = resolve_path(params.run.out_dir, params_base(params))
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(RUNS_DIR_ENV, str(runs))
            params = load_params(params_file)
            run = RunLayout.open(params)
            cohort = prepare_cohort(params, run, progress=False)
            train_diffusion(params, cohort.manifest, ImageCache(cohort.cache_dir), run,
                            progress=False)
    nbformat.write(_explorer_notebook(params_file), folder / "explorer.ipynb")
    labconfig = folder / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(  # no "Jupyter news?" toast
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, RUNS_DIR_ENV: str(runs), "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(folder / "config"),
           "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(folder / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces")}
    log = (folder / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True",
         # nothing beyond 127.0.0.1: no update check, news feed or PyPI extension manager
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n"
                                + (folder / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token, folder
    finally:
        try:
            for kernel in _api(base, token, "/api/kernels") or []:
                _api(base, token, f"/api/kernels/{kernel['id']}", "DELETE")
        except OSError:
            pass
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab, chromium) -> object:
    """Headless Chromium (the session's ``chromium`` fixture) with a tall window."""
    return chromium("1400,2600")


def test_explorer_generates_and_compares_in_jupyterlab(lab, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, token, folder = lab
    shots = folder / "screenshots"
    shots.mkdir()
    browser.get(f"{base}/lab/tree/explorer.ipynb?token={token}")
    # An output image can be replaced between finding it and reading it (the widget redraws):
    # the wait then looks again instead of failing.
    wait = WebDriverWait(browser, STARTUP_S,
                         ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: d.execute_script(
        "const app = window.jupyterapp; const nb = app && app.shell.currentWidget;"
        "return !!(nb && nb.sessionContext && nb.sessionContext.session"
        " && nb.sessionContext.session.kernel);"))
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    generate = wait.until(EC.element_to_be_clickable((By.XPATH, BUTTON.format("Generate"))))
    browser.save_screenshot(str(shots / "1_widgets.png"))

    generate.click()
    grid = wait.until(EC.visibility_of_element_located((By.XPATH, OUTPUT_IMAGE)))
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth > 0", grid))
    grid_src = grid.get_attribute("src")
    grid_w, grid_h = (browser.execute_script(f"return arguments[0].natural{k}", grid)
                      for k in ("Width", "Height"))
    browser.save_screenshot(str(shots / "2_generate.png"))

    Select(browser.find_element(By.XPATH, "//div[contains(@class, 'widget-dropdown')]"
                                          "[.//label[normalize-space()='compare']]//select")
           ).select_by_visible_text("Pleural Effusion")
    browser.find_element(By.XPATH, "//div[contains(@class, 'widget-checkbox')]"
                                   "[.//span[normalize-space()='nearest training image']]"
                                   "//input").click()
    browser.find_element(By.XPATH, BUTTON.format("Compare")).click()
    wait.until(lambda d: (img := d.find_elements(By.XPATH, OUTPUT_IMAGE))
               and img[0].get_attribute("src") != grid_src
               and d.execute_script("return arguments[0].naturalWidth > 0", img[0]))
    compare = browser.find_element(By.XPATH, OUTPUT_IMAGE)
    cmp_w, cmp_h = (browser.execute_script(f"return arguments[0].natural{k}", compare)
                    for k in ("Width", "Height"))
    widget = browser.find_element(By.XPATH, "//div[contains(@class, 'widget-vbox')]"
                                             "[.//div[contains(@class, 'widget-output')]]")
    browser.execute_script("arguments[0].scrollIntoView()", widget)
    widget.screenshot(str(shots / "3_compare.png"))
    if os.environ.get("CXRLIB_EXPLORER_SCREENSHOT"):
        shutil.copyfile(shots / "3_compare.png", os.environ["CXRLIB_EXPLORER_SCREENSHOT"])

    # one row of 4 images, then 5 rows (without, its neighbours, with, neighbours, difference)
    assert grid_h / grid_w < 0.5 < 1.0 < cmp_h / cmp_w, (grid_w, grid_h, cmp_w, cmp_h)
    stderr = [e.text for e in browser.find_elements(By.CSS_SELECTOR, STDERR)]
    assert not stderr, f"cells wrote to stderr: {stderr}"
    assert len(list(shots.glob("*.png"))) == 3
