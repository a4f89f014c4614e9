"""Test-session set-up shared by tests/ and the nbval notebook runs.

Every run folder of the session (including the smoke run the notebooks execute under nbval)
goes to one temporary folder, so tests never touch ``runs/`` in the checkout.
"""

import io
import os
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cxrlib.core.layout import RUNS_DIR_ENV


def pytest_configure(config):
    if not os.environ.get(RUNS_DIR_ENV):
        os.environ[RUNS_DIR_ENV] = tempfile.mkdtemp(prefix="cxrlib-test-runs-")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a busy 2-core machine more threads make tiny ops
    ~100x slower (OpenMP threads spin while waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> SimpleNamespace:
    """``python -m cxrlib run`` on the smoke preset, once per session: the five notebooks
    executed, their pages and the landing page rendered into a temporary reports folder.
    ``out`` and ``err`` hold what the run printed (the notebooks' own output streams there).
    Its tests read it; the notebooks are executed nowhere else in a session."""
    from cxrlib.notebook_runner import run_pipeline

    params = Path(__file__).parent / "params" / "smoke.yaml"
    reports = tmp_path_factory.mktemp("reports")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        index = run_pipeline(params, reports_root=reports)
    return SimpleNamespace(params=params, index=index, reports=reports / "smoke",
                           reports_root=reports, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="session")
def chromium():
    """Start headless Chromium drivers: ``chromium("1280,1000")`` gives one with that window
    size, through the system chromedriver (Selenium Manager never runs), with every host but
    127.0.0.1 unresolvable; all are quit when the session ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def start(window_size: str):
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", f"--window-size={window_size}", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps",
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                                  options=options)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


#: Tests that need the one-node SLURM cluster (tests/test_cluster.py's ``slurm`` mark).
_SLURM_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "SLURM" in str(report.longrepr):
        _SLURM_SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """In CI (``CI=true``, where .ci/run starts a cluster) the SLURM tests must have run."""
    if os.environ.get("CI") == "true" and _SLURM_SKIPPED and exitstatus == 0:
        print(f"\nCI: {len(_SLURM_SKIPPED)} SLURM test(s) were skipped, but CI starts a "
              f"one-node cluster (.ci/slurm-up) for them: {', '.join(_SLURM_SKIPPED)}")
        session.exitstatus = 1
