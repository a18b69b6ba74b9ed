"""A screenshot of the demo page (``GET /``) showing a real answer, taken with headless Chromium.

Drives a running server (``--url``): types the tweet, attaches the picture, asks for the
entities, then picks two of them for ``/re`` and saves the page as a PNG. Uses Debian's
Chromium through Playwright's Python package (never ``playwright install``).

    python -m service &                      # or: make serve
    python bench/screenshot_demo.py --url http://127.0.0.1:8000 --out docs/demo.png \\
        --text "alice smith is in paris with the bulls" --image photo.jpg --head alice --tail paris

Without ``--image`` it attaches a generated photo-like JPEG; ``--key`` (or ``IMM_API_KEY``) is
entered when the server asks for one; ``--head``/``--tail`` pick entities by their text (default:
the first two found).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages
    sys.path.insert(0, str(ROOT))

from model.preprocessing.synthetic import synthetic_jpeg  # noqa: E402

#: Chromium flags for a machine with no display, no sandbox (containers) and no network access.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> str | None:
    """Debian's Chromium (``apt-get install chromium``), or ``$CHROMIUM`` when set."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright: Any, executable: str) -> Any:
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def entity_mark(page: Any, text: str | None, index: int) -> Any:
    marks = page.locator("#tweet mark.entity")
    if text is None:
        return marks.nth(index)
    return marks.filter(has_text=text).first


def take(
    url: str,
    out: Path,
    text: str,
    image: Path | None,
    head: str | None,
    tail: str | None,
    key: str | None,
    width: int = 960,
) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    if executable is None:
        raise SystemExit("Chromium not found: apt-get install chromium (or set CHROMIUM=/path/to/it)")
    picture = {"name": image.name, "mimeType": "image/jpeg", "buffer": image.read_bytes()} if image else None
    picture = picture or {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": synthetic_jpeg(480, 320)}
    with sync_playwright() as playwright:
        browser = launch(playwright, executable)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(url.rstrip("/") + "/")
        page.fill("#text", text)
        page.set_input_files("#image", files=[picture])
        page.click("#submit")
        page.wait_for_selector("#key-box:not([hidden]), #result:not([hidden]), #error:not(:empty)")
        if page.is_visible("#key-box"):
            if not key:
                raise SystemExit("the server needs an API key: pass --key or set IMM_API_KEY")
            page.fill("#key", key)
            page.press("#key", "Enter")
        page.wait_for_selector("#result:not([hidden]), #error:not(:empty)")
        if page.locator("#error").inner_text():
            raise SystemExit(f"the server answered an error: {page.locator('#error').inner_text()}")
        if page.locator("#tweet mark.entity").count() >= 2:
            entity_mark(page, head, 0).click()
            entity_mark(page, tail, 1).click()
            page.wait_for_selector("#relation:not([hidden])")
        page.mouse.move(0, 0)  # no hover tooltip in the picture
        page.evaluate("document.activeElement && document.activeElement.blur()")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"))
    parser.add_argument("--text", default="alice smith is in paris with the bulls today #win")
    parser.add_argument("--image", type=Path, help="a JPEG to attach (default: a generated one)")
    parser.add_argument("--head", help="text of the first entity to pick (default: the first found)")
    parser.add_argument("--tail", help="text of the second entity to pick (default: the second found)")
    parser.add_argument("--key", default=os.environ.get("IMM_API_KEY"), help="API key, if the server has one")
    parser.add_argument("--width", type=int, default=960, help="viewport width in CSS pixels")
    args = parser.parse_args(argv)
    take(args.url, args.out, args.text, args.image, args.head, args.tail, args.key, args.width)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
