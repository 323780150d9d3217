"""The page at `/` in a real headless Chromium (Debian's, driven by Playwright) against a real
server with the embedded SmolLM2 over a small FAQ store: ask and watch the answer stream, follow a
citation to its passage, upload / ask / delete a document, see the cache figures move, and see the
API's own words when something is refused."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.datasets import load_dataset
from ragcache.settings import Settings
from serve.settings import ServeSettings
from tests.ingest_support import embedder
from tests.serve.server import ServerThread, free_port

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
API_KEY = "web-test-key-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory, core: Settings) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("web")
    faq = load_dataset().corpus_dir / "faq" / "general"
    files = sorted(faq.glob("q00*.rst"))[:6]
    run_job(
        JobSpec(paths=tuple(map(str, files)), db_dir=tmp / "db", generator=MODEL),
        core.home,
        embedder=embedder(),
    )
    settings = ServeSettings(
        port=free_port(),
        db_dir=tmp / "db",
        model=MODEL,
        cache_dir=tmp / "kv",
        uploads_dir=tmp / "uploads",
        batches_dir=tmp / "batches",
        api_key=API_KEY,
        answer_mode="auto",  # the model runs (tokens stream), the answer shown is checked
        max_tokens=64,
        max_upload_bytes=64 * 1024,
    )
    server = ServerThread(settings, core).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed (scripts/setup.sh installs it)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, web_server: ServerThread):  # type: ignore[no-untyped-def]
    context = browser.new_context()
    page = context.new_page()
    page.goto(web_server.base_url + "/")
    page.fill("#token", API_KEY)  # the page asks once; the tab keeps it
    page.click("#token-form button[type=submit]")
    playwright.expect(page.locator("#status")).to_contain_text("chunks")
    yield page
    context.close()


def ask(page, question: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#question", question)
    page.keyboard.press("Enter")


def test_the_page_loads_without_a_token_and_then_asks_for_it(
    browser, web_server: ServerThread
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(web_server.base_url + "/")
    playwright.expect(page.locator("#token-form")).to_be_visible()
    page.fill("#token", "wrong-token-000000")
    page.click("#token-form button[type=submit]")
    playwright.expect(page.locator("#status")).to_contain_text("token needed")
    # a request with the wrong token shows the API's own words
    page.click("[data-tab=documents]")
    playwright.expect(page.locator("#error")).to_contain_text("missing or wrong bearer token")
    context.close()


def test_an_answer_streams_in_and_its_citation_opens_the_passage(page) -> None:  # type: ignore[no-untyped-def]
    ask(page, "What is Python?")
    # tokens arrive while the answer is still being written
    page.wait_for_function(
        """() => { const a = document.querySelector('#thread li:last-child .answer');
                   return a && a.getAttribute('aria-busy') === 'true' && a.textContent.length > 0; }""",
        timeout=120_000,
    )
    figures = page.locator("#thread li:last-child .figures-line")
    playwright.expect(figures).to_contain_text("first token", timeout=120_000)
    citation = page.locator("#thread li:last-child .citation").first
    playwright.expect(citation).to_be_visible()
    assert page.locator("#sources li").count() >= 1
    citation.click()
    playwright.expect(page.locator("#passage")).to_be_visible()
    assert page.locator("#passage-text mark").count() >= 1  # the supporting text, highlighted
    # a follow-up continues the conversation (its earlier turn stays on the page)
    ask(page, "Who created it?")
    playwright.expect(page.locator("#thread li")).to_have_count(2)
    playwright.expect(page.locator("#thread li:last-child .figures-line")).to_contain_text(
        "first token", timeout=120_000
    )


def test_upload_list_ask_about_and_delete_a_document(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    note = tmp_path / "okapi-care.md"
    note.write_text(
        "# Okapi care\n\nOkapis at the Lindenfeld zoo are fed willow leaves every morning at "
        "seven by the keeper Ilse Marbach.\n",
        encoding="utf-8",
    )
    page.click("[data-tab=documents]")
    page.set_input_files("#files", str(note))
    page.click("#upload-form button[type=submit]")
    playwright.expect(page.locator("#upload-result")).to_contain_text("ingested okapi-care.md")
    row = page.locator("#documents-body tr", has_text="okapi-care.md")
    playwright.expect(row).to_have_count(1)
    page.click("[data-tab=ask]")
    ask(page, "What are the okapis at the Lindenfeld zoo fed?")
    playwright.expect(page.locator("#sources")).to_contain_text("okapi-care.md", timeout=120_000)
    playwright.expect(page.locator("#thread li:last-child .figures-line")).to_contain_text(
        "first token", timeout=120_000
    )
    page.click("[data-tab=documents]")
    page.click("button[aria-label='Delete okapi-care.md']")
    playwright.expect(page.locator("#upload-result")).to_contain_text("deleted okapi-care.md")
    playwright.expect(page.locator("#documents-body tr", has_text="okapi-care.md")).to_have_count(0)


def test_an_oversized_upload_shows_the_api_error(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.txt"
    big.write_text("x" * (200 * 1024), encoding="utf-8")
    page.click("[data-tab=documents]")
    page.set_input_files("#files", str(big))
    page.click("#upload-form button[type=submit]")
    playwright.expect(page.locator("#error")).to_be_visible()
    playwright.expect(page.locator("#error")).to_contain_text(re.compile("too large", re.I))


def test_the_cache_view_moves_after_a_repeated_question(page) -> None:  # type: ignore[no-untyped-def]
    page.click("[data-tab=cache]")
    saved = page.locator("dd[data-figure='Tokens saved']")
    playwright.expect(saved).to_be_visible()
    before = saved.inner_text()
    page.click("[data-tab=ask]")
    for _ in range(2):
        ask(page, "Why is it called Python?")
        playwright.expect(page.locator("#thread li:last-child .figures-line")).to_contain_text(
            "first token", timeout=120_000
        )
        page.click("#new-conversation")
    page.click("[data-tab=cache]")
    playwright.expect(saved).not_to_have_text(before, timeout=10_000)
    playwright.expect(page.locator("#cache-tree li").first).to_be_visible()


def test_the_keyboard_alone_asks_and_opens_a_citation(page) -> None:  # type: ignore[no-untyped-def]
    page.click("#new-conversation")  # leaves the focus in the question box
    page.keyboard.type("Is Python free to use?")
    page.keyboard.press("Enter")
    playwright.expect(page.locator("#thread li:last-child .figures-line")).to_contain_text(
        "first token", timeout=120_000
    )
    citation = page.locator("#thread li:last-child .citation").first
    playwright.expect(citation).to_be_visible()
    for _ in range(40):  # Tab through the page until the citation has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('citation')"):
            break
    assert page.evaluate("document.activeElement.classList.contains('citation')")
    page.keyboard.press("Enter")
    playwright.expect(page.locator("#passage")).to_be_visible()
    assert page.evaluate("document.activeElement.id") == "passage-close"
    page.keyboard.press("Enter")
    playwright.expect(page.locator("#passage")).to_be_hidden()
