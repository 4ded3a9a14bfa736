"""The playground page (`GET /` of `sdrt serve`) in a real headless Chromium, driven by selenium
with Debian's `chromium` and `chromium-driver` (no downloaded browser): type a prompt, wait for the
image and check it is the PNG the server made; cancel from the page; errors shown in the page.

The server is the real `sdrt serve` on the demo model's export, on 127.0.0.1 at a free port, in
its own process group, stopped by that group's id."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (BROWSER and DRIVER):
    pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver "
                "(.ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install 'sdrt[test]'")
pytest.importorskip("uvicorn", reason="sdrt serve needs the serve extra: pip install 'sdrt[serve]'")

KEY = "playground-test-key"
PAGE_WAIT_S = 30      # the page loads /v1/info
IMAGE_WAIT_S = 180    # one demo image on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base: str, method: str, path: str, key: str | None = KEY, body: dict | None = None):
    """(status, parsed JSON body) of one request to the server."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group, SIGKILL if it has not exited in 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(demo_fp32, tmp_path_factory):
    """`sdrt serve` with an API key; yields its base URL once /ready answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", str(demo_fp32), "--host", "127.0.0.1",
                                 "--port", str(port), "--api-key", KEY, "--max-batch", "2"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"sdrt serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"sdrt serve not ready in 180 s:\n{log.read_text()[-3000:]}"
            try:
                if http(base, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        yield base
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception as e:
        shown = driver.execute_script("return document.getElementById('status').textContent + ' | ' + "
                                      "document.getElementById('error').textContent")
        raise AssertionError(f"{what} not seen in {timeout} s; page says: {shown}") from e


def open_page(driver, base: str, key: str = KEY, ready: bool = True):
    """Load the page with the key typed in its field; wait until /v1/info filled the form."""
    from selenium.webdriver.common.by import By
    driver.get(base + "/")
    field = driver.find_element(By.ID, "apikey")
    driver.execute_script("arguments[0].closest('details').open = true", field)
    field.clear()
    field.send_keys(key)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    if ready:
        wait_for(driver, lambda d: d.find_element(By.ID, "sampler").find_elements(By.TAG_NAME, "option")
                 and d.find_element(By.ID, "generate").is_enabled(), PAGE_WAIT_S, "the form filled from /v1/info")


def fill(driver, **fields):
    from selenium.webdriver.common.by import By
    for name, value in fields.items():
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(str(value))


def page_state(driver) -> tuple[str, str]:
    return driver.execute_script("const s = document.getElementById('status'); "
                                 "return [s.dataset.state || '', s.dataset.jobId || '']")


def test_page_draws_the_prompt_and_shows_the_servers_png(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    with urllib.request.urlopen(server + "/", timeout=30) as r:       # the page needs no key; its API calls do
        assert r.status == 200 and b"sdrt playground" in r.read()
    assert http(server, "GET", "/v1/info", key=None)[0] == 401
    open_page(browser, server)
    from sdrt.engine.samplers import SAMPLER_NAMES
    options = browser.find_element(By.ID, "sampler").find_elements(By.TAG_NAME, "option")
    assert [o.get_attribute("value") for o in options] == list(SAMPLER_NAMES)     # the runtime's samplers
    width = int(browser.find_element(By.ID, "width").get_attribute("value"))
    height = int(browser.find_element(By.ID, "height").get_attribute("value"))
    fill(browser, prompt="a large red circle on a blue background", steps=8, seed=11, n=2)
    browser.find_element(By.ID, "generate").click()
    images = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#images img"), IMAGE_WAIT_S, "the images")
    assert len(images) == 2
    browser.save_screenshot(str(tmp_path / "playground.png"))

    state, job_id = page_state(browser)
    assert state == "succeeded" and job_id, "the page did not record the job"
    status, result = http(server, "GET", f"/v1/jobs/{job_id}/result")
    assert status == 200 and result["seeds"] == [11, 12]
    for img_el, b64 in zip(images, result["images"]):
        src = img_el.get_attribute("src")
        assert src == "data:image/png;base64," + b64                  # the server's own image, in order
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and img.size == (width, height)
        lo, hi = img.convert("L").getextrema()
        assert lo < hi, "a blank image"
        assert img_el.get_attribute("naturalWidth") == str(width)      # the browser decoded it
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert "done, seeds 11, 12" in browser.find_element(By.ID, "status").text


def test_cancel_from_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    open_page(browser, server)
    status, info = http(server, "GET", "/v1/info")
    assert status == 200
    steps_max = (info.get("steps") or {}).get("max") or 200
    # the most steps at 16x the demo's pixels: still running when the click lands, on an idle machine too
    fill(browser, prompt="a small blue square on a white background", steps=steps_max, seed=1, width=128, height=128)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda d: page_state(d)[0] in ("queued", "running"), PAGE_WAIT_S, "the job queued or running")
    _, job_id = page_state(browser)
    browser.save_screenshot(str(tmp_path / "playground-running.png"))
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda d: "cancelled" in d.find_element(By.ID, "status").text, 60, "the cancellation")
    wait_for(browser, lambda d: d.find_element(By.ID, "generate").is_enabled(), 30, "the form ready again")
    assert http(server, "GET", f"/v1/jobs/{job_id}")[1]["state"] == "cancelled"
    assert browser.find_elements(By.CSS_SELECTOR, "#images img") == []
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_the_servers_errors_show_in_the_page(server, browser):
    from selenium.webdriver.common.by import By
    open_page(browser, server)
    width = int(browser.find_element(By.ID, "width").get_attribute("value"))
    fill(browser, prompt="a small red circle", width=width + 1)      # not a multiple of the VAE factor
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: error.is_displayed(), PAGE_WAIT_S, "the error")
    assert "width" in error.text.lower() and "HTTP 4" in error.text
    assert browser.find_element(By.ID, "generate").is_enabled()

    open_page(browser, server, key="not-the-key", ready=False)                  # a wrong key: 401, said in the page
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: error.is_displayed(), PAGE_WAIT_S, "the 401")
    assert "401" in error.text and "API key" in error.text
