"""The demo page at ``GET /``, driven end to end in headless Chromium (Debian's, through Playwright).

The server runs the small exported test bundles with an API key, in a thread (real HTTP on
loopback): the page must load without the key, ask for it once, then show the entities and the
relations between them (one ``POST /extract``), the relation of two entities chosen by mouse and
by keyboard, and the API's errors next to their field; with no RE model it falls back to ``/ner``.
Without Chromium the browser test skips locally and fails in CI (``CI`` set, as ``.ci/run`` does).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.screenshot_demo import CHROMIUM_ARGS
from service import Settings, create_app
from service.app import STATIC_DIR
from tests.conftest import jpeg_bytes
from tests.test_service import ServerThread, make_settings

API_KEY = "demo-secret"
TWEET = "alice smith 👍 is in london with the knicks #win"


def chromium_or_skip() -> str:
    """Chromium's path; without it (or without playwright) skip, or fail when ``CI`` is set."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    missing = None if path else "Chromium is not installed (apt-get install chromium; make install does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}: the demo page test must run in CI")
    if missing:
        pytest.skip(missing)
    return str(path)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, trained_ner_checkpoint, trained_re_checkpoint) -> dict[str, Path]:
    from export import export_bundle

    root = tmp_path_factory.mktemp("demo_bundles")
    return {
        task: export_bundle(checkpoint, root / task, log=lambda _: None)
        for task, checkpoint in (("ner", trained_ner_checkpoint), ("re", trained_re_checkpoint))
    }


@pytest.fixture(scope="module")
def server(bundles) -> Iterator[str]:
    with ServerThread(create_app(make_settings(bundles, api_key=API_KEY))) as url:
        yield url


# --- the page and its files, without a browser -----------------------------------------------


def test_page_is_served_without_the_key_and_loads_nothing_from_elsewhere():
    app = create_app(Settings(ner_bundle=None, re_bundle=None, api_key=API_KEY))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            page = await http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "svg")):
                answer = await http.get(f"/static/{name}")
                assert answer.status_code == 200 and kind in answer.headers["content-type"], name
            assert (await http.post("/ner", data={"text": "alice"})).status_code == 401  # still guarded
            assert "/" not in (await http.get("/openapi.json")).json()["paths"]

    asyncio.run(scenario())
    for file in STATIC_DIR.iterdir():
        # No CDN, font or analytics: every URL in the page's files is a path on this server.
        text = re.sub(r'xmlns="[^"]*"', "", file.read_text())  # a namespace name, never fetched
        assert not re.search(r"\b(?:https?:)?//[\w.-]+\.\w", text), file.name


def test_api_docs_are_served_by_this_server():
    """/docs is Swagger UI from the swagger-ui-bundle package: no CDN, so it works offline."""
    app = create_app(Settings(ner_bundle=None, re_bundle=None, api_key=API_KEY))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            page = await http.get("/docs")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            policy = page.headers["content-security-policy"]
            assert "default-src 'self'" in policy and "'sha256-" in policy and "unsafe" not in policy
            # Every URL of the page is a path on this server, and each of them answers.
            urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
            assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
            for url in urls:
                assert (await http.get(url)).status_code == 200, url
            assert (await http.get("/docs/assets/index.html")).status_code == 404  # its petstore demo
            assert (await http.get("/redoc")).status_code == 404  # ReDoc would come from a CDN

    asyncio.run(scenario())


# --- the page in Chromium ----------------------------------------------------------------------


def entities(page) -> list[tuple[str, str]]:
    """(type, text) of each highlighted entity; the text without its type label."""
    return [
        tuple(pair)
        for pair in page.eval_on_selector_all(
            "#tweet mark.entity", "marks => marks.map(m => [m.dataset.type, m.firstChild.textContent])"
        )
    ]


def relation_lines(answer: dict) -> list[str]:
    """The relation list as the page should write it for an /extract answer."""
    entities = answer["entities"]
    return [
        f"{entities[r['head']]['text']} → {r['relation']} → {entities[r['tail']]['text']} "
        f"{100 * r['score']:.1f} %"
        for r in answer["relations"]
    ]


def test_the_page_end_to_end_in_chromium(server, bundles):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except Exception as error:  # a broken Chromium is a failure, never a skip
            pytest.fail(f"Chromium ({chromium}) did not start: {error}")
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            expect.set_options(timeout=20_000)
            crashes: list[str] = []
            requested: list[str] = []
            page.on("pageerror", lambda error: crashes.append(str(error)))
            page.on("request", lambda request: requested.append(request.url))
            posted: list[str] = []
            page.on("request", lambda request: request.method == "POST" and posted.append(request.url))

            page.goto(server + "/")
            expect(page).to_have_title(re.compile("IMM demo"))
            expect(page.locator("#models")).to_contain_text("NER")

            # A tweet and a JPEG; the server wants a key: the page asks for it, then answers.
            page.fill("#text", TWEET)
            page.set_input_files(
                "#image", files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": jpeg_bytes()}]
            )
            expect(page.locator("#preview")).to_be_visible()
            page.click("#submit")
            expect(page.locator("#key-box")).to_be_visible()
            expect(page.locator("#key")).to_be_focused()
            page.fill("#key", API_KEY)
            page.press("#key", "Enter")

            expect(page.locator("#result")).to_be_visible()
            expect(page.locator("#key-box")).to_be_hidden()
            found = entities(page)
            assert ("PER", "alice smith") in found and ("LOC", "london") in found, found
            # The tweet reads as sent (the emoji's code point offsets did not shift the spans).
            shown = page.eval_on_selector(
                "#tweet",
                "t => { const c = t.cloneNode(true);"
                " c.querySelectorAll('.entity-type').forEach(l => l.remove()); return c.textContent; }",
            )
            assert shown == TWEET
            meta = page.locator("#ner-meta")
            expect(meta).to_contain_text("picture used")
            expect(meta).to_contain_text(re.compile(r"server time \d+\.\d ms"))
            alice = page.locator("#tweet mark.entity", has_text="alice smith")
            expect(alice).to_have_attribute("data-score", re.compile(r"\d+\.\d %"))
            expect(alice).to_have_attribute("title", re.compile(r"PER · score \d+\.\d %"))

            # The relations, in the same call: one POST /extract (after the one the key prompt stopped).
            assert [url.removeprefix(server) for url in posted] == ["/extract", "/extract"], posted
            expected = httpx.post(
                server + "/extract",
                data={"text": TWEET, "pairs": "typed"},
                files={"image": ("photo.jpg", jpeg_bytes(), "image/jpeg")},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            ).json()
            assert expected["entities"] and len(expected["relations"]) >= 2, expected
            items = page.locator("#relation-list li")
            expect(items).to_have_count(len(expected["relations"]))
            assert items.all_inner_texts() == relation_lines(expected)
            expect(page.locator("#relations-title")).to_have_text(f"Relations ({len(expected['relations'])})")
            expect(meta).to_contain_text(f"models {expected['models']['ner']}, {expected['models']['re']}")
            # Focusing a relation outlines its two entities; choosing it shows its scores (/re).
            first = expected["relations"][0]
            head_text = expected["entities"][first["head"]]["text"]
            tail_text = expected["entities"][first["tail"]]["text"]
            items.first.locator("button").focus()
            expect(page.locator("#tweet mark.entity.related")).to_have_count(2)
            items.first.locator("button").click()
            expect(page.locator("#relation-answer")).to_contain_text(
                f"{head_text} → {first['relation']} → {tail_text}"
            )
            expect(page.locator("#tweet mark.entity.head")).to_contain_text(head_text)
            expect(page.locator("#tweet mark.entity.tail")).to_contain_text(tail_text)

            # The first entity by mouse, the second by keyboard: a relation, with bars.
            alice.click()
            expect(alice).to_have_attribute("aria-pressed", "true")
            london = page.locator("#tweet mark.entity", has_text="london")
            london.focus()
            page.keyboard.press("Enter")
            expect(page.locator("#relation")).to_be_visible()
            expect(page.locator("#relation-answer")).to_contain_text(
                "alice smith → /per/loc/place_of_residence → london"
            )
            bars = page.locator("#bars li")
            expect(bars).to_have_count(3)  # the test model knows 3 relations
            expect(bars.first).to_have_class(re.compile("best"))
            expect(bars.first).to_contain_text("/per/loc/place_of_residence")
            expect(page.locator("#re-meta")).to_contain_text("server time")

            # A text file as the picture: the API's 415 message, next to the picture.
            page.set_input_files(
                "#image", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}]
            )
            expect(page.locator("#preview")).to_be_hidden()
            page.click("#submit")
            expect(page.locator("#image-error")).to_have_text(
                "Not an image file (unsupported or unknown format)"
            )
            expect(page.locator("#image")).to_have_attribute("aria-invalid", "true")
            expect(page.locator("#key-box")).to_be_hidden()  # the key was asked for once

            # No picture and no text: the API's message next to the text; Ctrl+Enter submits.
            page.click("#clear-image")
            page.fill("#text", "")
            page.press("#text", "Control+Enter")
            expect(page.locator("#text-error")).not_to_be_empty()
            expect(page.locator("#image-error")).to_be_empty()

            assert not crashes, crashes
            assert all(url.startswith((server, "blob:")) for url in requested), requested

            # A server without an RE model: the page asks /ner, and shows no relation list.
            with ServerThread(create_app(make_settings(bundles, re_bundle=None, warmup=False))) as ner_only:
                posted.clear()
                page.goto(ner_only + "/")
                expect(page.locator("#models")).to_contain_text("RE: absent")
                expect(page.locator("#submit")).to_have_text("Find entities")
                page.fill("#text", TWEET)
                page.click("#submit")
                expect(page.locator("#result")).to_be_visible()
                assert ("PER", "alice smith") in entities(page)
                expect(page.locator("#relations")).to_be_hidden()
                assert [url.removeprefix(ner_only) for url in posted] == ["/ner"], posted
            assert not crashes, crashes
        finally:
            browser.close()


def test_the_api_docs_in_chromium_offline(server):
    """Swagger UI renders the operations and runs one, with every request answered by this server."""
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except Exception as error:  # a broken Chromium is a failure, never a skip
            pytest.fail(f"Chromium ({chromium}) did not start: {error}")
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            expect.set_options(timeout=20_000)
            elsewhere: list[str] = []
            errors: list[str] = []

            def offline(route) -> None:  # as without internet: anything not from this server fails
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", offline)
            page.on("pageerror", lambda error: errors.append(str(error)))
            # A Content-Security-Policy violation is reported as a console error.
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))

            page.goto(server + "/docs")
            expect(page).to_have_title("IMM inference service: API")
            paths = page.locator(".opblock-summary-path")
            for path in ("/ner", "/re", "/extract", "/health", "/ready", "/metrics"):
                expect(paths.filter(has_text=re.compile(f"^{path}$"))).to_have_count(1)
            expect(page.locator(".opblock-post")).to_have_count(3)

            # Try one: GET /health from the page, answered by the server.
            health = page.locator(
                ".opblock-get", has=page.locator(".opblock-summary-path", has_text="/health")
            )
            health.locator(".opblock-summary").click()
            health.locator("button.try-out__btn").click()
            health.locator("button.execute").click()
            expect(health.locator(".live-responses-table tbody td.response-col_status")).to_have_text("200")

            assert not elsewhere, elsewhere
            assert not errors, errors
        finally:
            browser.close()
