"""The writing page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
type a prompt, Write, watch the text stream in, Stop, Use this, and a screenshot; and a page of another site that
tries to make the server write."""

import functools
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import LOOPBACK, PROMPT, TinyRun, make_app, running_server
from serve import Limits

pytestmark = pytest.mark.slow
INSTALL = "bash tests/install-browser"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile; a missing browser fails the test with how to install it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail(f"the browser test needs Chromium and its driver; install them with `{INSTALL}` (as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except WebDriverException as e:
        pytest.fail(f"Chromium did not start ({e.msg}); reinstall it with `{INSTALL}`")
    try:
        yield driver
    finally:
        driver.quit()


def candidate_text(driver: webdriver.Chrome, n: int = 0) -> str:
    return driver.find_elements(By.CSS_SELECTOR, ".candidate .text")[n].get_attribute("textContent")


def test_write_stream_stop_and_use_this(run: TinyRun, browser: webdriver.Chrome, tmp_path: Path):
    with running_server(make_app(run, limits=Limits(max_new_tokens=100_000))) as base:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 20, poll_frequency=0.02)
        wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("tiny"))
        story = browser.find_element(By.ID, "story")
        story.send_keys(PROMPT)
        length = browser.find_element(By.ID, "max_new_tokens")
        length.clear()
        length.send_keys("100000")  # long enough to be watched while it is written
        Select(browser.find_element(By.ID, "num_samples")).select_by_visible_text("2")

        browser.find_element(By.ID, "write").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".candidate")) == 2)
        wait.until(lambda d: len(candidate_text(d)) > len(PROMPT))
        first = candidate_text(browser)
        assert first.startswith(PROMPT)
        wait.until(lambda d: len(candidate_text(d)) > len(first) + 10)  # it grows while being written
        assert browser.find_element(By.ID, "state").text == "writing…"
        # the rate appears once 0.2 s of writing have passed: a fast machine writes 10 characters sooner
        wait.until(lambda d: d.find_element(By.ID, "rate").text.endswith("tokens/s"))

        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "state").text == "stopped")
        assert "first character after" in browser.find_element(By.ID, "rate").text
        use = browser.find_elements(By.CSS_SELECTOR, ".candidate .use")[0]
        assert use.is_enabled()
        text = candidate_text(browser)
        continuation = text[len(PROMPT):]
        assert len(continuation) > 10
        # this model repeats its training text, so the copy check marks what it wrote
        assert browser.find_elements(By.CSS_SELECTOR, ".candidate mark.copied")
        assert "copied: longest" in browser.find_elements(By.CSS_SELECTOR, ".candidate .note")[0].text

        use.click()
        assert story.get_attribute("value") == PROMPT + continuation
        assert "used" in browser.find_elements(By.CSS_SELECTOR, ".candidate")[0].get_attribute("class")
        shot = tmp_path / "writing-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_a_bad_value_shows_the_server_message(run: TinyRun, browser: webdriver.Chrome):
    with running_server(make_app(run, limits=Limits(max_new_tokens=300))) as base:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 20, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("tiny"))
        browser.execute_script("document.getElementById('max_new_tokens').max = ''")  # bypass the page's own bound
        length = browser.find_element(By.ID, "max_new_tokens")
        length.clear()
        length.send_keys("5000")
        browser.find_element(By.ID, "write").click()
        error = browser.find_element(By.ID, "error")
        wait.until(lambda d: error.is_displayed())
        assert error.text.startswith("max_new_tokens: Input should be less than or equal to 300")
        assert browser.find_element(By.ID, "write").is_enabled()


ATTACK = """<!doctype html><meta charset="utf-8"><title>another site</title><iframe name="sink"></iframe>
<form id="form" method="POST" enctype="text/plain" target="sink" action="TARGET/api/generate">
<input name='{"prompt": "PROMPT", "max_new_tokens": 5, "x": "' value='"}'></form>
<script>
const target = "TARGET", body = JSON.stringify({prompt: "PROMPT", max_new_tokens: 5}), results = [];
(async () => {
  await fetch(target + "/api/generate",
              {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body})
    .then(() => results.push("no-cors sent"), () => results.push("no-cors failed"));
  await fetch(target + "/api/generate", {method: "POST", headers: {"Content-Type": "application/json"}, body})
    .then(r => results.push("json read " + r.status), () => results.push("json blocked"));
  await fetch(target + "/api/info")
    .then(r => results.push("info read " + r.status), () => results.push("info blocked"));
  navigator.sendBeacon(target + "/api/stop", new Blob([JSON.stringify({id: "x"})], {type: "text/plain"}));
  document.getElementById("form").submit();
  document.title = "done: " + results.join(", ");
})();
</script>"""


def test_a_page_of_another_site_cannot_make_the_server_write(run: TinyRun, browser: webdriver.Chrome,
                                                             tmp_path: Path):
    """A page on another port of 127.0.0.1 (same site, other origin) sends what a browser lets it send without
    asking: a no-cors text/plain fetch, a text/plain form shaped as JSON, a beacon; a JSON fetch and a read of
    /api/info need CORS. The server refuses every one that arrives (403); nothing is generated."""
    seen: list[tuple[str, str, int]] = []
    app = make_app(run, allowed_hosts=LOOPBACK)

    async def recorded(scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.start":
                seen.append((scope["method"], scope["path"], message["status"]))
            await send(message)
        await app(scope, receive, record if scope["type"] == "http" else send)

    with running_server(recorded) as base:
        (tmp_path / "attack.html").write_text(ATTACK.replace("TARGET", base).replace("PROMPT", PROMPT),
                                              encoding="utf-8")
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
        handler.log_message = lambda *args: None
        other = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        try:
            browser.get(f"http://127.0.0.1:{other.server_address[1]}/attack.html")
            WebDriverWait(browser, 20).until(lambda d: d.title.startswith("done:"))
            assert browser.title == "done: no-cors sent, json blocked, info blocked"
            deadline = time.monotonic() + 10  # the beacon and the form go out after the title is set
            while len([s for s in seen if s[0] == "POST"]) < 3:
                assert time.monotonic() < deadline, f"not every request arrived: {seen}"
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            other.shutdown()
    api = [s for s in seen if s[1].startswith("/api/")]
    assert sorted(api) == [("GET", "/api/info", 403), ("OPTIONS", "/api/generate", 403),
                           ("POST", "/api/generate", 403), ("POST", "/api/generate", 403),
                           ("POST", "/api/stop", 403)], seen
