"""Headless Debian Chromium driven by Playwright, for the tests that look at pages."""

import contextlib
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Root needs --no-sandbox; the machine has no GPU (WebGL in software, SwiftShader) and no network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                 "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]

# True once the first Cornerstone viewport's canvas holds an image: many distinct grey levels.
VIEWPORT_HAS_IMAGE = """() => {
    const c = document.querySelector('canvas.cornerstone-canvas');
    if (!c || !c.width || !c.height) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const levels = new Set();
    for (let i = 0; i < d.length; i += 4 * 7) levels.add(d[i]);
    return levels.size > 32;
}"""


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 800):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def wait_for_viewport_image(page, timeout_ms: int = 60_000):
    """Wait for OHIF's viewport to draw an image; close the first-visit tour; return the canvas."""
    canvas = page.wait_for_selector("canvas.cornerstone-canvas", timeout=timeout_ms)
    page.wait_for_function(VIEWPORT_HAS_IMAGE, timeout=timeout_ms, polling=250)
    skip_tour = page.get_by_text("Skip all")
    if skip_tour.count():
        skip_tour.first.click()
    page.wait_for_timeout(500)  # let the overlays settle for the screenshot
    return canvas
