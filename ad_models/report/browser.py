"""The report as a person sees it: rendered by a real browser (headless Chromium through Playwright),
with what went wrong on the page, and a screenshot.

Playwright drives the machine's own Chromium (Debian package `chromium`, or `ADPIPE_CHROMIUM`), so no
browser download is needed: `pip install adpipe[browser]`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class PageCheck:
    title: str
    images: int  # <img> elements on the page
    broken_images: list[str] = field(default_factory=list)  # their alt text (or source) when they did not load
    console_errors: list[str] = field(default_factory=list)  # console.error and uncaught exceptions
    failed_requests: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.broken_images or self.console_errors or self.failed_requests)


def find_chromium() -> str | None:
    """The Chromium to drive: `ADPIPE_CHROMIUM`, else the first of BROWSER_NAMES on PATH."""
    return os.environ.get("ADPIPE_CHROMIUM") or next(filter(None, map(shutil.which, BROWSER_NAMES)), None)


def check_page(page_file: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               width: int = 1400, timeout_s: float = 60) -> PageCheck:
    """Open an HTML file in headless Chromium, wait until it has loaded, and report what a reader
    would see go wrong: images that did not decode, console errors, failed requests. With
    `screenshot`, the whole page is saved there as PNG."""
    from playwright.sync_api import sync_playwright  # optional: only this check needs a browser

    browser_path = find_chromium()
    if browser_path is None:
        raise RuntimeError(f"no Chromium found ({', '.join(BROWSER_NAMES)} on PATH, or ADPIPE_CHROMIUM): "
                           "install the Debian package chromium")
    url = Path(page_file).resolve().as_uri()
    errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"],
                                             timeout=timeout_s * 1000)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: failed.append(f"{request.url[:120]}: {request.failure}"))
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            images = page.evaluate("Array.from(document.images).map(i => "
                                   "[i.complete && i.naturalWidth > 0, i.alt || i.src.slice(0, 80)])")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            title = page.title()
        finally:
            browser.close()
    return PageCheck(title=title, images=len(images), broken_images=[name for loaded, name in images if not loaded],
                     console_errors=errors, failed_requests=failed)
