"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by playwright; never `playwright
install`): type a prompt, watch the per-chunk counter and dropped-word highlighting, generate with the tiny
engine, click a token's heatmap, and save a screenshot under artifacts/. Skips cleanly without chromium."""

import os
import shutil
from pathlib import Path

import pytest

from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ModelEntry, ServerSettings
from server_fixtures import ServerThread

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CLIPDIFFUSION_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def page_url():
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from clipdiffusion.testing import tiny_pipeline

    settings = ServerSettings(models=(ModelEntry("tiny"),), max_width=64, max_height=64, max_steps=20)
    with ServerThread(create_app(lambda name: tiny_pipeline(seed=0), settings)) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser(page_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()


def test_page_counts_tokens_generates_and_shows_heatmaps(browser, page_url):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_url + "/")
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")

    page.fill("#prompt", "a red circle")
    page.wait_for_function("document.querySelector('#prompt-counter').textContent === '3/75'")
    assert page.locator("#prompt-tokens .tok").count() == 3

    long_prompt = ", ".join(["a red circle above a blue square"] * 12)  # 12 * 8 - 1 = 95 tokens
    page.fill("#prompt", long_prompt)
    page.wait_for_function("document.querySelector('#prompt-counter').textContent.includes(' | ')")
    assert page.locator("#prompt-tokens .boundary").count() == 1
    assert page.locator("#prompt-tokens .tok.dropped").count() == 0
    page.select_option("#long_prompt", "truncate")
    page.wait_for_function("document.querySelectorAll('#prompt-tokens .tok.dropped').length > 0")
    assert page.locator("#prompt-counter").text_content() == "75/75"
    assert page.locator("#prompt-tokens .tok.dropped").count() == 95 - 75

    page.fill("#prompt", "a red circle")
    page.fill("#steps", "3")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#result-image:not([hidden])", timeout=60_000)
    page.wait_for_selector("#attention-strip .heat")
    labels = page.locator("#attention-strip .heat span").all_text_contents()
    assert labels == ["a", "red", "circle"]
    page.locator("#attention-strip .heat").nth(1).click()
    assert page.locator("#overlay").is_visible()
    params = page.input_value("#parameters")
    assert params.startswith("a red circle") and "Seed: 7" in params and "Steps: 3" in params
    assert "seed 7" in page.locator("#status").text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "server_page.png"), full_page=True)
    assert errors == []
    page.close()


def test_page_shows_validation_errors(browser, page_url):
    page = browser.new_page()
    page.goto(page_url + "/")
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")
    page.fill("#prompt", "x")
    page.fill("#width", "36")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert "width=36" in page.locator("#status").text_content()
    assert not page.locator("#generate").is_disabled()
    page.close()
