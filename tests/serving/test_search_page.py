"""The search page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against a live uvicorn server on a free loopback port: pick an image, see result cards with scores; on a
bundle with a text model, type a query. Skips cleanly where the browser is not installed."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from pipeline.serving.api import create_app
from tests.serving.api_helpers import double_app
from tests.serving.tiny_bundle import shared_tiny_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver not installed")


@contextmanager
def live_server(app):
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # The driver's path given: selenium-manager never looks for (downloads) one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("the page did not get there in time")


def test_pick_an_image_and_see_scored_results(browser, tmp_path_factory, tmp_path):
    pytest.importorskip("tensorflow")
    from selenium.webdriver.common.by import By

    root, info = shared_tiny_bundle(tmp_path_factory)
    query = tmp_path / "query.png"
    query.write_bytes(info["images"]["green-4"])
    with live_server(create_app(root)) as url:
        browser.get(url + "/")
        wait_for(lambda: "24 items" in browser.find_element(By.ID, "bundle-info").text)
        assert not browser.find_element(By.ID, "text-form").is_displayed()    # no text model in this bundle
        browser.find_element(By.ID, "image-input").send_keys(str(query))
        cards = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results .card"))
        assert len(cards) == 10
        scores = [float(card.find_element(By.CLASS_NAME, "score").text.split("·")[1]) for card in cards]
        assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-3)
        assert all(card.find_element(By.CLASS_NAME, "label").text for card in cards)
        assert cards[0].find_element(By.CLASS_NAME, "label").text == "green"
        assert "10 results" in browser.find_element(By.ID, "status").text
        wait_for(lambda: browser.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(name.startswith(url) for name in resources)   # nothing from elsewhere (no CDN)


def test_text_query_and_an_error_shown_on_the_page(browser):
    from selenium.webdriver.common.by import By

    app, _ = double_app(has_text=True)
    with live_server(app) as url:
        browser.get(url + "/")
        form = browser.find_element(By.ID, "text-form")
        wait_for(form.is_displayed)
        box = browser.find_element(By.ID, "text-input")
        box.send_keys("something blue")
        box.submit()
        cards = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results .card"))
        assert {card.find_element(By.CLASS_NAME, "label").text for card in cards[:4]} == {"blue"}
        browser.find_element(By.ID, "filter").send_keys("colour=blue")
        box.submit()
        status = browser.find_element(By.ID, "status")
        wait_for(lambda: "error 400" in status.text)
        assert "unknown filter column" in status.text and not browser.find_elements(By.CSS_SELECTOR, ".card")


def test_docs_page_renders_the_schema_offline(browser):
    from selenium.webdriver.common.by import By

    with live_server(double_app(token="t0ken")[0]) as url:
        browser.get(url + "/docs")
        headings = wait_for(lambda: [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#endpoints h2")])
        assert {"POST /search", "POST /embed", "GET /health", "POST /items", "DELETE /items/{item_id}"} <= set(headings)
