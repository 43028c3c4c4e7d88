"""Screenshot of the web page with the embedded model, for the README (docs/page.png).

    .venv/bin/python scripts/screenshot_page.py docs/page.png

Serves the embedded model on a free loopback port, drives Debian's Chromium through Playwright (never `playwright
install`): types a prompt longer than one chunk, generates, clicks a token's attention heatmap, and saves the page.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from clipdiffusion.pipeline import Pipeline  # noqa: E402
from clipdiffusion.server.app import create_app  # noqa: E402
from clipdiffusion.server.settings import ModelEntry, ServerSettings  # noqa: E402
from server_fixtures import ServerThread  # noqa: E402

PROMPT = ("a large red circle at the top left and a large blue square at the bottom right on a white background, "
          "masterpiece, best quality, highly detailed, 8k, sharp focus, intricate, trending on artstation, "
          "award winning, beautiful composition, volumetric light, ultra realistic, octane render, dramatic, "
          "golden hour, soft shadows, depth of field, bokeh, film grain, vivid colors")


def main(out: str) -> None:
    settings = ServerSettings(models=(ModelEntry("clipdiffusion-tiny"),))
    with ServerThread(create_app(lambda name: Pipeline.default(), settings)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#sampler').options.length > 0")
        page.fill("#prompt", PROMPT)
        page.select_option("#long_prompt", "truncate")
        page.wait_for_function("document.querySelectorAll('#prompt-tokens .tok.dropped').length > 0")
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_selector("#result-image:not([hidden])", timeout=120_000)
        page.wait_for_selector("#attention-strip .heat")
        page.locator("#attention-strip .heat").nth(3).click()
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/page.png")
