"""The rendered reports as a collaborator opens them: the smoke run's landing page and
statistics page in headless Chromium at 1,280 px.

What a reader needs: a header that says the images are phantoms, no table wider than the
page, no experiment identifier in the visible text (arms are named for people), no stderr
boxes (progress bars, warnings), and the forest plot of paired differences. Skips where
Chromium, chromedriver or Selenium are missing (``apt-get install chromium
chromium-driver``).
"""

from __future__ import annotations

import shutil

import pytest

from cxrlib.core.config import load_params
from cxrlib.experiments.grid import plan_grid

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTH = 1280

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver on PATH (Debian: apt-get install chromium "
           "chromium-driver); the reports' browser test needs both")


@pytest.fixture(scope="module")
def page(chromium) -> object:
    """Headless Chromium at 1,280 px wide, no network."""
    pytest.importorskip("selenium")
    return chromium(f"{WIDTH},1000")


def _identifiers(smoke_pipeline) -> set[str]:
    return {e.name for e in plan_grid(load_params(smoke_pipeline.params))}


#: Tables whose right edge lies beyond the page's width, and stderr output boxes.
WIDE_TABLES = ("return [...document.querySelectorAll('table')].filter(t => "
               "t.getBoundingClientRect().right > document.documentElement.clientWidth + 1)"
               ".map(t => t.innerText.slice(0, 80))")
STDERR = "[data-mime-type='application/vnd.jupyter.stderr']"


@pytest.mark.parametrize("name", ["index.html", "05_statistics.html", "03_sampling_explorer.html",
                                  "04_classifier_experiments.html"])
def test_a_report_reads_as_a_collaborator_needs(smoke_pipeline, page, name):
    from selenium.webdriver.common.by import By

    page.get((smoke_pipeline.reports / name).as_uri())
    text = page.find_element(By.TAG_NAME, "body").text
    assert "Phantom data, not X-ray images" in text.split("\n", 3)[0] + text[:600]
    assert "phantoms (internal)" in text  # test sets named for what they are
    assert page.execute_script(WIDE_TABLES) == []
    assert not page.find_elements(By.CSS_SELECTOR, STDERR)
    shown = [i for i in _identifiers(smoke_pipeline) if i in text]
    assert not shown, f"{name} shows experiment identifiers: {shown}"
    assert "<cxrlib." not in page.page_source and "object at 0x" not in text  # no raw reprs


def test_the_landing_page_answers_first_with_the_forest_plot(smoke_pipeline, page):
    from selenium.webdriver.common.by import By

    page.get(smoke_pipeline.index.as_uri())
    forest = page.find_element(By.CSS_SELECTOR, "img[src='forest.png']")
    assert page.execute_script("return arguments[0].naturalWidth", forest) > 0
    headline = page.find_element(By.CSS_SELECTOR, "p").text
    assert "95% CI" in headline and "against" in headline
    # the answer comes before the list of pages, the parameters are folded away
    body = page.find_element(By.TAG_NAME, "body").text
    assert body.index("The paper's claims") < body.index("The pages")
    assert '"resolution"' not in body


def test_the_check_for_identifiers_can_fail(smoke_pipeline, page):
    """A page that shows an identifier fails the check above (the check is not vacuous)."""
    from selenium.webdriver.common.by import By

    some = sorted(_identifiers(smoke_pipeline))[0]
    page.get(f"data:text/html,<p>{some} vs baseline</p>")
    text = page.find_element(By.TAG_NAME, "body").text
    assert [i for i in _identifiers(smoke_pipeline) if i in text]
