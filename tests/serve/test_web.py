"""The web chat page in a real headless Chromium (Debian's /usr/bin/chromium, driven by playwright) against a real
server on a loopback port: type a message and watch the answer stream in, stop a long answer, reload and find the
session again, rename and delete sessions, and enter an API key when the server needs one.

Elements are found by their accessible names (get_by_label / get_by_role), so the test also checks the labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from server_zoo import TEMPLATE, FakeBackend, ServerThread, make_chat_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (Debian package `chromium`)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """serve(api_keys=None, sessions=True) -> a running server over a tiny model with a long context (2048), so that an answer lasts
    long enough to be stopped; sessions in a fresh SQLite file."""
    from camelid.serve.app import create_app
    from camelid.serve.backend import LocalBackend
    from camelid.serve.sessions import SessionStore

    model_dir = make_chat_model(tmp_path_factory.mktemp("web-model") / "tiny", context=2048)
    running: list[ServerThread] = []

    def start(api_keys: list[str] | None = None, sessions: bool = True) -> ServerThread:
        backend = LocalBackend.load(model_dir, name="tiny", template=TEMPLATE, kv_cache_memory="16MB")
        db = tmp_path_factory.mktemp("web-db") / "chats.db"
        store = SessionStore(f"sqlite:///{db}") if sessions else None
        server = ServerThread(create_app(backend, api_keys=api_keys, sessions=store))
        server.backend = backend
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    missing: list[str] = []  # the page's own files (the API's 404s are answers some tests ask for)
    page.on("response", lambda r: r.status == 404 and "/v1/" not in r.url and missing.append(r.url))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not missing, f"the page asked for files the server does not have: {missing}"


def settings(page):
    """The Settings disclosure, opened."""
    if not page.locator("#settings").evaluate("d => d.open"):
        page.get_by_text("Settings", exact=True).click()
    return page


def send(page, text: str) -> None:
    """Type a message and press Enter; returns once the page shows the answer's bubble (streaming or done)."""
    before = page.locator(".message.assistant").count()
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.message.assistant').length > {before}")


def wait_idle(page) -> None:
    """The answer is over: Send is enabled again."""
    page.wait_for_function("() => !document.getElementById('send').disabled && !document.querySelector('[aria-busy]')")


def session_titles(page) -> list[str]:
    return page.locator("#sessions .session-title").all_inner_texts()


def test_chat_stream_reload_rename_delete(serve, page):
    server = serve()
    page.goto(server.url)
    page.wait_for_function("() => document.querySelector('#model option[value=\"tiny\"]')")
    assert page.get_by_label("Model").input_value() == "tiny"
    settings(page).get_by_label("Max tokens").fill("200")
    # greedy, so the answers are the same on every run (a range input takes its value from a script)
    page.get_by_label("Temperature").evaluate("t => { t.value = 0; t.dispatchEvent(new Event('input')); }")
    assert page.locator("#temperature-value").inner_text() == "0"
    page.get_by_label("System prompt").fill("Answer briefly.")

    # record the lengths the answer shows while it streams in
    page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const answer = document.querySelector('.message.assistant .content');
        if (answer) window.seen.push(answer.textContent.length);
    }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    send(page, "Hello, who are you?")
    wait_idle(page)
    answer = page.locator(".message.assistant .content").inner_text()
    partial = [n for n in page.evaluate("window.seen") if 0 < n < len(answer)]
    assert partial, "the answer appeared in one piece, not streamed"
    assert page.locator("#status").inner_text() == ""  # no error shown

    # the server stored the turn in a session with the page's settings
    sessions = httpx.get(f"{server.url}/v1/sessions").json()["data"]
    assert [s["title"] for s in sessions] == ["Hello, who are you?"] == session_titles(page)
    stored = httpx.get(f"{server.url}/v1/sessions/{sessions[0]['id']}").json()
    assert stored["system_prompt"] == "Answer briefly." and stored["model"] == "tiny"
    assert [(m["role"], m["content"].strip()) for m in stored["messages"] if m["role"] != "system"] == \
        [("user", "Hello, who are you?"), ("assistant", answer.strip())]

    # reload: the session is listed and reopened with its messages and system prompt
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert session_titles(page) == ["Hello, who are you?"]
    assert page.locator(".message.user .content").all_inner_texts() == ["Hello, who are you?"]
    assert page.locator(".message.assistant .content").inner_text().strip() == answer.strip()
    assert page.get_by_label("System prompt").input_value() == "Answer briefly."

    # a follow-up turn joins the same session (the server sends the history)
    send(page, "And then?")
    wait_idle(page)
    assert len(httpx.get(f"{server.url}/v1/sessions/{sessions[0]['id']}").json()["messages"]) == 4

    # stop a long answer: the request ends in the browser and in the engine
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".message").count() == 0
    settings(page).get_by_label("Max tokens").fill("1900")
    # a tiny model answers fast: press Stop from inside the page as soon as the first text shows (after a click on
    # the session's own title, which must not wipe the answer that streams in)
    page.evaluate("""() => new MutationObserver((_, observer) => {
        const answer = document.querySelector('.message.assistant[aria-busy] .content');
        if (answer && answer.textContent) {
            observer.disconnect();
            document.querySelector('#sessions li.current .session-title').click();
            window.shown = document.querySelectorAll('.message').length;
            document.getElementById('stop').click();
        }
    }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
    send(page, "Tell me a long story")
    wait_idle(page)
    assert page.locator("#status").inner_text() == "Stopped."
    assert page.evaluate("window.shown") == 2
    stats = lambda: server.backend.stats()  # noqa: E731
    page.wait_for_function("() => true")  # let the abort cross to the engine thread
    for _ in range(400):  # up to 20 s: a CI machine at full load is slow to switch threads
        if stats()["num_running"] == 0 and stats()["num_waiting"] == 0:
            break
        page.wait_for_timeout(50)
    assert stats()["num_running"] == 0 and stats()["num_free_blocks"] == stats()["num_blocks"]
    assert sorted(session_titles(page)) == ["Hello, who are you?", "Tell me a long story"]

    # rename the first session (Enter saves), then delete the other one
    item = page.locator("#sessions li", has_text="Hello, who are you?")
    item.get_by_role("button", name="Rename").click()
    page.get_by_label("New title").fill("Greetings")
    page.get_by_label("New title").press("Enter")
    page.wait_for_function("() => [...document.querySelectorAll('#sessions .session-title')]"
                           ".some(b => b.textContent === 'Greetings')")
    assert sorted(s["title"] for s in httpx.get(f"{server.url}/v1/sessions").json()["data"]) == \
        ["Greetings", "Tell me a long story"]
    page.locator("#sessions li", has_text="Tell me a long story").get_by_role("button", name="Delete").click()
    page.wait_for_function("() => document.querySelectorAll('#sessions li').length === 1")
    assert [s["title"] for s in httpx.get(f"{server.url}/v1/sessions").json()["data"]] == ["Greetings"]
    page.reload()
    page.wait_for_selector("#sessions li")
    assert session_titles(page) == ["Greetings"]

    # the page titles a new session with the first 40 characters of its message: an emoji there is not cut in two
    # (half of a UTF-16 surrogate pair is not text: the server refused the session, so the message could not be sent)
    page.get_by_role("button", name="New chat").click()
    settings(page).get_by_label("Max tokens").fill("5")
    # first a message the server refuses (longer than the context): no session is left named after it
    page.get_by_label("Message").fill("z" * 3000)
    page.get_by_label("Message").press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('context')")
    wait_idle(page)
    assert session_titles(page) == ["Greetings"]
    assert [s["title"] for s in httpx.get(f"{server.url}/v1/sessions").json()["data"]] == ["Greetings"]
    page.get_by_label("Message").fill("a" * 39 + "😀 and more")
    page.get_by_label("Message").press("Enter")
    page.wait_for_function("() => document.querySelector('.message.assistant') || "
                           "document.getElementById('status').textContent")
    wait_idle(page)
    assert page.locator("#status").inner_text() == ""
    assert sorted(session_titles(page)) == ["Greetings", "a" * 39 + "😀…"]

    # an answer that ends while the user renames a session neither cuts the rename short nor takes the focus
    page.locator("#sessions li", has_text="Greetings").get_by_role("button", name="Rename").click()
    page.get_by_label("New title").press_sequentially("Hel")
    page.evaluate("() => { document.getElementById('prompt').value = 'One more'; "
                  "document.getElementById('composer').requestSubmit(); }")  # sent with the focus kept in the rename
    wait_idle(page)
    page.get_by_label("New title").press_sequentially("lo there")
    page.get_by_label("New title").press("Enter")
    page.wait_for_function("() => !document.querySelector('.rename-input')")
    assert sorted(session_titles(page)) == ["Hello there", "a" * 39 + "😀…"]

    # open one session, then another before the first has loaded: the page shows the second only
    slow = page.locator("#sessions li", has_text="Hello there").get_attribute("data-id")
    page.evaluate("""(slow) => { const fetch = window.fetch; window.fetch = (url, init) => url.endsWith('/' + slow)
        ? new Promise((r) => setTimeout(r, 300)).then(() => fetch(url, init)).finally(() => window.slowDone = true)
        : fetch(url, init); }""", slow)
    page.locator("#sessions li", has_text="Hello there").locator(".session-title").click()
    page.locator("#sessions li", has_text="a" * 39).locator(".session-title").click()
    page.wait_for_function("() => window.slowDone")
    page.wait_for_timeout(200)  # the late answer's handling
    assert page.locator(".message.user .content").all_inner_texts() == ["a" * 39 + "😀 and more", "One more"]


def test_api_key_is_asked_for_and_remembered(serve, page):
    server = serve(api_keys=["secret-key"])
    page.goto(server.url)
    page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
    assert page.locator("#model option").count() == 0
    assert page.locator("#settings").evaluate("d => d.open")  # opened for the user
    page.get_by_label("API key").fill("typo-key")  # a wrong key is not a missing one
    page.get_by_label("API key").press("Tab")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('did not accept')")
    page.get_by_label("API key").fill("secret-key")
    page.get_by_label("API key").press("Tab")  # `change` fires: the page retries with the key
    page.wait_for_function("() => document.querySelector('#model option[value=\"tiny\"]')")
    page.reload()  # kept in localStorage
    page.wait_for_function("() => document.querySelector('#model option[value=\"tiny\"]')")
    assert settings(page).get_by_label("API key").input_value() == "secret-key"


@pytest.fixture(scope="module")
def sessionless(serve):
    return serve(sessions=False)


def test_a_server_without_sessions_gets_the_history_from_the_page(sessionless, page):
    server = sessionless
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url)
    page.wait_for_function("() => document.getElementById('sessions-heading').textContent.includes('off')")
    settings(page).get_by_label("Max tokens").fill("5")
    page.get_by_label("System prompt").fill("Be brief.")
    for text in ("First", "Second"):
        send(page, text)
        wait_idle(page)
    assert page.locator("#status").inner_text() == ""
    first_answer = page.locator(".message.assistant .content").first.evaluate("e => e.textContent")
    assert [b.get("session_id") for b in bodies] == [None, None]
    assert bodies[1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First"},
                                     {"role": "assistant", "content": first_answer},
                                     {"role": "user", "content": "Second"}]


def test_a_refused_message_goes_back_to_the_box_and_an_old_answer_stays_out_of_a_new_chat(sessionless, page):
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(sessionless.url)
    page.wait_for_function("() => document.getElementById('sessions-heading').textContent.includes('off')")
    settings(page).get_by_label("Max tokens").fill("5")
    page.get_by_label("Temperature").evaluate("t => { t.value = 0; t.dispatchEvent(new Event('input')); }")  # greedy

    # longer than the context: the server refuses it (400), so it is not part of the chat; the text is not lost
    too_long = "x" * 3000
    page.get_by_label("Message").fill(too_long)
    page.get_by_label("Message").press("Enter")
    wait_idle(page)
    page.wait_for_function("() => document.getElementById('status').textContent.includes('context')")
    assert page.locator(".message").count() == 0
    assert page.get_by_label("Message").input_value() == too_long
    html = '<img src=x onerror="window.pwned = true"> <script>window.pwned = true</script> **not bold**'
    send(page, html)  # shown as text, never parsed as HTML (nor markdown)
    wait_idle(page)
    assert page.locator("#status").inner_text() == ""
    assert bodies[-1]["messages"] == [{"role": "user", "content": html}]
    assert page.locator(".message.user .content").inner_text() == html
    assert page.evaluate("() => !window.pwned && !document.querySelector('#log img, #log script, #log strong')")

    # the server cannot be reached: said in words (fetch's own message is "Failed to fetch"), the text kept
    page.route("**/v1/chat/completions", lambda route: route.abort())
    page.get_by_label("Message").fill("Anyone there?")
    page.get_by_label("Message").press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent")
    wait_idle(page)
    assert page.locator("#status").inner_text().startswith("No connection to the server")
    assert page.get_by_label("Message").input_value() == "Anyone there?"
    page.unroute("**/v1/chat/completions")

    # New chat while an answer streams, then Stop: the old answer does not join the new chat's history
    page.get_by_role("button", name="New chat").click()
    settings(page).get_by_label("Max tokens").fill("1900")
    page.evaluate("""() => new MutationObserver((_, observer) => {
        const answer = document.querySelector('.message.assistant[aria-busy] .content');
        if (answer && answer.textContent) {
            observer.disconnect();
            document.getElementById('new-session').click();
            document.getElementById('stop').click();
            window.switched = true;
        }
    }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
    page.get_by_label("Message").fill("Tell me a long story")  # not send(): the answer's bubble goes at once
    page.get_by_label("Message").press("Enter")
    page.wait_for_function("() => window.switched")
    wait_idle(page)
    settings(page).get_by_label("Max tokens").fill("5")
    send(page, "שלום, עולם!")  # Hebrew: shown right to left (its "!" at the left end), as it was typed
    wait_idle(page)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "שלום, עולם!"}]
    assert page.locator(".message.user .content").evaluate("e => getComputedStyle(e).direction") == "rtl"

    # a long answer keeps the log at its end, unless the user scrolls up to read: then the log stays where they are
    page.set_viewport_size({"width": 800, "height": 360})  # the log overflows
    settings(page).get_by_label("Max tokens").fill("1900")
    page.get_by_text("Settings", exact=True).click()  # closed again
    page.evaluate("""() => { const log = document.getElementById('log'); let seen = 0, step = 0;
        new MutationObserver((_, observer) => {
            const answer = document.querySelector('.message.assistant[aria-busy] .content');
            if (!answer || answer.textContent.length <= seen) return;
            seen = answer.textContent.length;
            if (step++ === 0) return;
            if (step === 2) {  // the log overflows, and has followed the answer so far: scroll up to read
                const gap = log.scrollHeight - log.scrollTop - log.clientHeight;
                window.followed = log.scrollHeight > log.clientHeight && gap < 2;
                log.scrollTop = 0;
            } else { observer.disconnect(); window.kept = log.scrollTop; document.getElementById('stop').click(); }
        }).observe(log, {subtree: true, childList: true, characterData: true}); }""")
    send(page, "Tell me another long story")
    wait_idle(page)
    assert page.evaluate("window.followed") and page.evaluate("window.kept") == 0


def test_the_page_is_revalidated_so_an_upgrade_takes_effect(sessionless):
    # without Cache-Control a browser caches the files by heuristic (a tenth of their age) and, even on reload, runs
    # the old app.js against the upgraded server; with no-cache it asks each time (a 304 while a file is unchanged)
    for path in ("/", "/static/app.js", "/static/style.css"):
        response = httpx.get(sessionless.url + path)
        assert response.status_code == 200 and response.headers["cache-control"] == "no-cache", path
        if path != "/":
            etag = response.headers["etag"]
            assert httpx.get(sessionless.url + path, headers={"If-None-Match": etag}).status_code == 304, path


def test_a_page_opened_while_the_server_has_no_model_asks_again_on_send(page):
    """A cluster whose workers are all restarting lists no model: the page says so, and a message sent once a worker
    is back finds its model (it went out as model '' and came back as 'The model '' does not exist')."""
    from camelid.serve.app import create_app
    from camelid.serve.backend import Chunk

    async def hello(prompt):
        yield Chunk(0, "Hi!", [1], "stop", 1, 1)

    class Restarting(FakeBackend):
        up = False

        def models(self):
            return super().models() if self.up else []

    backend = Restarting(hello)
    server = ServerThread(create_app(backend))
    try:
        page.goto(server.url)
        page.wait_for_function("() => document.getElementById('status').textContent.includes('no models')")
        page.wait_for_timeout(200)  # the page has finished starting: the message stays
        assert "no models" in page.locator("#status").inner_text()
        page.get_by_label("Message").fill("Hello")
        page.get_by_label("Message").press("Enter")  # still none: refused, the text kept
        wait_idle(page)
        assert page.get_by_label("Message").input_value() == "Hello" and page.locator(".message").count() == 0
        backend.up = True
        send(page, "Hello")
        wait_idle(page)
        assert page.locator("#status").inner_text() == ""
        assert page.locator(".message.assistant .content").inner_text() == "Hi!"
        assert page.get_by_label("Model").input_value() == "tiny"
    finally:
        server.stop()
