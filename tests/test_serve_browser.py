"""`aid serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium opens the
page, opens the example photo through the file picker, paints a stroke with pointer events, runs AID at 23 NFE next
to replacement, waits for the results and checks what the page shows: outside the stroke the result's pixels are the
input's, inside they changed. The screenshot it takes is the README's (AID_SERVE_SCREENSHOT=PATH keeps a copy).

Skipped, with the reason, only where no browser can be installed: `.ci/run` installs chromium and chromium-driver.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aid_cli.serve.server import make_server, start_in_thread

from .conftest import REPO

EXAMPLE = REPO / "examples" / "chelsea.png"


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip with the reason."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p),
                    None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless Chromium here (Debian/Ubuntu: apt-get install chromium chromium-driver; .ci/run "
                    "installs them where it can)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=1280,1000", "--force-device-scale-factor=1", "--disable-extensions",
                "--force-color-profile=srgb", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server():
    srv = make_server(host="127.0.0.1", port=0, device="cpu", threads=1)  # the embedded backbone and its module
    start_in_thread(srv)
    try:
        yield srv
    finally:
        srv.close()


READ_PIXELS = """
const done = arguments[arguments.length - 1];
const pack = (data) => {  // bytes → base64, in chunks (String.fromCharCode takes so many arguments)
  let s = "";
  for (let i = 0; i < data.length; i += 32768) s += String.fromCharCode.apply(null, data.subarray(i, i + 32768));
  return btoa(s);
};
const rgba = (img) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, c.width, c.height).data;
};
const before = document.getElementById("compare-before"), after = document.getElementById("compare-after");
Promise.all([before.decode(), after.decode()]).then(() => done({
  width: after.naturalWidth, height: after.naturalHeight,
  before: pack(rgba(before)), after: pack(rgba(after)),
  hole: pack(window.aidPage.holeBits()), url: new URL(after.src).pathname,
  cards: document.querySelectorAll("#results .card img").length,
  timing: window.aidPage.lastTiming,
}));
"""


def _array(b64: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(shape)


def test_paint_a_stroke_fill_it_and_see_the_result(browser, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    # a file that is no image: the server's one line, on the page
    (tmp_path / "notes.png").write_bytes(b"not an image")
    browser.find_element(By.ID, "image-file").send_keys(str(tmp_path / "notes.png"))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed())
    assert error.text == "image is not an image Pillow can read: the uploaded image"
    browser.find_element(By.ID, "image-file").send_keys(str(EXAMPLE))  # the file picker
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.image"))
    canvas = browser.find_element(By.ID, "mask-canvas")
    assert browser.execute_script("return [arguments[0].width, arguments[0].height]", canvas) == [451, 300]

    # a stroke over the cat's eye, with the pointer (pointerdown, pointermove…, pointerup)
    size = browser.find_element(By.ID, "brush-size")
    browser.execute_script("arguments[0].value = 16; arguments[0].dispatchEvent(new Event('input'))", size)
    scale = canvas.size["width"] / 451
    actions = ActionChains(browser, duration=20)
    start = (int((150 - 225) * scale), int((95 - 150) * scale))  # offsets from the canvas centre, in CSS pixels
    actions.move_to_element_with_offset(canvas, *start).click_and_hold()
    for _ in range(6):
        actions.move_by_offset(int(12 * scale), int(3 * scale))
    actions.release().perform()
    count = "return window.aidPage.holeBits().reduce((a, b) => a + b, 0)"
    hole_count = browser.execute_script(count)
    assert 800 < hole_count < 0.1 * 451 * 300, hole_count
    assert not error.is_displayed()
    browser.find_element(By.ID, "undo").click()
    assert browser.execute_script(count) == 0
    browser.find_element(By.ID, "redo").click()
    assert browser.execute_script(count) == hole_count

    # AID (the embedded backbone's default) at 23 NFE, and replacement beside it
    methods = {el.get_attribute("value"): el for el in browser.find_elements(By.CSS_SELECTOR, "#methods input")}
    assert methods["aid"].is_selected() and not methods["replace"].is_selected()
    methods["replace"].click()
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "12"
    assert "23 NFE" in browser.find_element(By.ID, "steps").text
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 600, poll_frequency=0.25).until(
        lambda d: d.execute_script("return !window.aidPage.busy && document.querySelectorAll('#results .card img')"
                                   ".length === 2"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None, \
        browser.find_element(By.ID, "error").text

    seen = browser.execute_async_script(READ_PIXELS)
    assert (seen["width"], seen["height"], seen["cards"]) == (451, 300, 2)
    before = _array(seen["before"], (300, 451, 4))
    after = _array(seen["after"], (300, 451, 4))
    hole = _array(seen["hole"], (300, 451)).astype(bool)
    assert hole.sum() == hole_count
    # what the page shows: outside the stroke, the input's pixels exactly; inside, a fill
    assert np.array_equal(after[~hole], before[~hole])
    assert (after[hole] != before[hole]).any(axis=-1).mean() > 0.5
    # and what the server sent: visible pixels equal to the file's, in the file's own colours (the page's are
    # colour-managed through the photo's profile)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", seen["url"])
    sent = np.asarray(Image.open(io.BytesIO(conn.getresponse().read())).convert("RGB"))
    conn.close()
    original = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    assert np.array_equal(sent[~hole], original[~hole])
    assert (sent[hole] != original[hole]).any(axis=-1).mean() > 0.5
    assert seen["timing"] > 0
    label = browser.find_element(By.ID, "compare-label").text
    assert label.startswith("aid, seed 0")

    # a mask file loaded into the mask layer (decoded by the server) is what the page will send; undo brings the
    # stroke back
    mask_file = REPO / "examples" / "chelsea_mask.png"
    browser.find_element(By.ID, "mask-file").send_keys(str(mask_file))
    expected = int((np.asarray(Image.open(mask_file).convert("L")) >= 128).sum())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(count) == expected)
    browser.find_element(By.ID, "undo").click()
    assert browser.execute_script(count) == hole_count

    shot = tmp_path / "serve.png"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and len(np.unique(np.asarray(im.convert("L")))) > 50  # the page, not a blank one
        keep = os.environ.get("AID_SERVE_SCREENSHOT")
        if keep:
            im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(keep, optimize=True)
