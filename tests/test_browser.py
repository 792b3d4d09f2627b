"""The writing page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
type a prompt, Write, watch the text stream in, Stop, Use this, and a screenshot."""

import shutil
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import PROMPT, TinyRun, make_app, running_server
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
