"""Click to image with `aid serve` against `aid inpaint` from the shell, for the same fill (docs/serve.md, "Timing").

Two cases: a 64x64 image with a 24x24 hole (one fill at the embedded backbone's own size) and a 481x321 photo
(BSDS500's size; the first such photo of `--photos ZIP`, else the example photo resized) with one
60x50 hole. Each fill: the default method (AID on the embedded backbone), --steps 12 (23 NFE), seed 0.

  serve (HTTP)     the page's requests from the click on: the mask upload, the fill, polling every 150 ms as the
                   page does, the result's download; the server started once, with one warm-up fill not counted
  serve (browser)  with --browser: the real page in headless Chromium (Selenium), the mask loaded as a file, from the
                   click on Fill to the result image shown (the page's own window.aidPage.lastTiming)
  aid inpaint      the whole command from a shell (start-up, model load, fill, write), as a user runs it once

Runs alternate between the server and the shell so that the machine's drift hits both alike; medians of --repeats.
Timings mean something only on a quiet machine:

    python research/serve_timing.py --threads 2 --repeats 5 [--browser] [--json timing.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cases(folder: Path, photos: Path | None = None) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) of the two cases, written into `folder`."""
    chelsea = Image.open(REPO / "examples" / "chelsea.png").convert("RGB")
    small = chelsea.crop((150, 60, 310, 220)).resize((64, 64), Image.LANCZOS)
    photo = None
    if photos is not None and photos.is_file():
        with zipfile.ZipFile(photos) as z:
            for name in sorted(z.namelist()):
                if name.endswith(".jpg"):
                    im = Image.open(io.BytesIO(z.read(name))).convert("RGB")
                    if im.size == (481, 321):
                        photo, source = im, f"{photos.name}:{name}"
                        break
    if photo is None:
        photo, source = chelsea.resize((481, 321), Image.LANCZOS), "examples/chelsea.png resized"
    out = []
    for name, image, box in (("64x64", small, (20, 20, 44, 44)), (f"481x321 ({source})", photo, (210, 135, 270, 185))):
        hole = np.zeros(image.size[::-1], dtype=np.uint8)
        left, top, right, bottom = box
        hole[top:bottom, left:right] = 255
        stem = "small" if name == "64x64" else "photo"
        image.save(folder / f"{stem}.png")
        Image.fromarray(hole).save(folder / f"{stem}_mask.png")
        out.append((name, folder / f"{stem}.png", folder / f"{stem}_mask.png"))
    return out


class Client:
    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return json.loads(data) if response.getheader("Content-Type") == "application/json" else data

    def click_to_image(self, image_id: str, mask: bytes, steps: int) -> tuple[float, float]:
        """(seconds from the click to the result's bytes, the server's own sampler seconds)."""
        t0 = time.perf_counter()
        m = self.call("POST", f"/api/masks?image={image_id}", mask)
        body = json.dumps({"image": image_id, "mask": m["id"], "steps": steps, "seed": 0}).encode()
        job = self.call("POST", "/api/fill", body, {"Content-Type": "application/json"})
        while job["state"] not in ("done", "error"):
            time.sleep(0.15)  # the page polls this often
            job = self.call("GET", f"/api/jobs/{job['id']}")
        if job["state"] == "error":
            raise RuntimeError(job["error"])
        self.call("GET", job["results"][0]["url"])
        return time.perf_counter() - t0, job["results"][0]["seconds"]


def run_cli(image: Path, mask: Path, out: Path, steps: int, threads: int, env: dict) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aid_cli.cli", "inpaint", str(image), "--mask", str(mask), "-o", str(out),
                    "--steps", str(steps), "--seed", "0", "--threads", str(threads), "-q"], check=True, env=env)
    return time.perf_counter() - t0


def browser_session(url: str):
    """A headless Chromium on the page, or None (with the reason printed) where Selenium or Chromium is missing."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print("--browser: selenium is not installed; skipped", file=sys.stderr)
        return None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        print("--browser: no chromium/chromedriver; skipped", file=sys.stderr)
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    browser.get(url)
    return browser


def browser_click_to_image(browser, image: Path, mask: Path) -> float:
    """Open the image and its mask file on the page, click Fill, wait for the result: the page's own timing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 600, poll_frequency=0.05)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    browser.execute_script("delete document.body.dataset.image")
    browser.find_element(By.ID, "image-file").send_keys(str(image))
    wait.until(lambda d: d.execute_script("return document.body.dataset.image"))
    before = browser.execute_script("return window.aidPage.resultCount")
    browser.find_element(By.ID, "mask-file").send_keys(str(mask))
    wait.until(lambda d: d.execute_script("return window.aidPage.holeBits().some(b => b)"))
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.execute_script("return !window.aidPage.busy && window.aidPage.resultCount > arguments[0]",
                                          before))
    return browser.execute_script("return window.aidPage.lastTiming") / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="12: 23 NFE, 18: 35 NFE")
    parser.add_argument("--browser", action="store_true", help="also time the real page in headless Chromium")
    parser.add_argument("--json", type=Path, help="write the timings here too")
    parser.add_argument("--photos", type=Path, help="an EDM-layout zip holding a 481x321 JPEG photo")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), AID_THREADS=str(args.threads))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = subprocess.Popen([sys.executable, "-m", "aid_cli.cli", "serve", "--port", "0", "--threads",
                                   str(args.threads)], stdout=subprocess.PIPE, text=True, env=env)
        browser = None
        try:
            url = server.stdout.readline().strip()
            client = Client(url)
            browser = browser_session(url) if args.browser else None
            for name, image, mask in cases(folder, args.photos):
                image_id = client.call("POST", "/api/images", image.read_bytes())["id"]
                mask_bytes = mask.read_bytes()
                client.click_to_image(image_id, mask_bytes, args.steps)  # warm-up, not counted
                times = {"serve_http": [], "serve_sampler": [], "serve_browser": [], "cli": []}
                for _ in range(args.repeats):
                    wall, sampler = client.click_to_image(image_id, mask_bytes, args.steps)
                    times["serve_http"].append(wall)
                    times["serve_sampler"].append(sampler)
                    if browser is not None:
                        times["serve_browser"].append(browser_click_to_image(browser, image, mask))
                    times["cli"].append(run_cli(image, mask, folder / "out.png", args.steps, args.threads, env))
                record = {"case": name, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
                          "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          **{k: round(statistics.median(v), 3) for k, v in times.items() if v}}
                records.append(record)
                shown = f"  browser {record['serve_browser']:.2f} s" if "serve_browser" in record else ""
                print(f"{name}: aid serve {record['serve_http']:.2f} s (sampler {record['serve_sampler']:.2f} s)"
                      f"{shown}  |  aid inpaint {record['cli']:.2f} s  ({record['cli'] / record['serve_http']:.1f}x)",
                      flush=True)
        finally:
            if browser is not None:
                browser.quit()
            server.terminate()
            server.wait(30)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
