"""The playground page in a real browser (Debian's chromium + chromedriver, driven by selenium) against a real
``far serve`` on 127.0.0.1: choose a class, type a seed, press Enter; the previews arrive coarse to fine, one per outer
step, before the final image, and the final image is ``Generator.generate()``'s for that seed, pixel for pixel.

Marked ``browser`` (`.ci/run` installs chromium and runs it as its own step); skipped, with the reason, where
chromium, chromedriver or selenium is missing. ``FAR_SCREENSHOT_DIR=docs`` writes the README's screenshots there.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("FAR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FAR_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync"
).split()
BUNDLE = ROOT / "engines" / "far-demo"
STEPS, CLASS, SEED = 10, 7, 1234


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FarServe:
    """``far serve`` in its own process (its own local Ray), as a user starts it; stopped with Ctrl-C (SIGINT)."""

    def __init__(self):
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [sys.executable, "-m", "far_sdk.cli.main", "serve", "--bundle", str(BUNDLE), "--backend", "onnxruntime"]
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", "--port", str(port), "--cpus-per-replica", "0.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C below reaches the server's whole process group, as a terminal's does
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.url = f"http://127.0.0.1:{port}/"
        self.lines: list[str] = []
        self.result = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            if "ready at" in line or not line:
                break
        if "ready at" not in self.lines[-1]:
            self.stop()
            raise AssertionError(f"far serve did not start: {self.result}")

    def stop(self) -> tuple[int, str, str]:
        """Ctrl-C, then (status, stdout, stderr); once."""
        if self.result is None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
            out, err = self.proc.communicate(timeout=120)
            self.result = (self.proc.returncode, "".join(self.lines) + out, err)
        return self.result


@pytest.fixture(scope="module")
def far_serve():
    server = FarServe()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        why = f"{', '.join(missing)} missing: make browser-deps (apt-get install -y chromium chromium-driver)"
        if os.environ.get("FAR_REQUIRE_BROWSER"):
            pytest.fail(why)  # make test-browser: a skipped browser test must not pass for green
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = Path(__import__("tempfile").mkdtemp(prefix="far-chromium-"))
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument("--window-size=1000,1200")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _png(src: str) -> np.ndarray:
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    out = Path(os.environ.get("FAR_SCREENSHOT_DIR", tmp_path)) / name
    driver.save_screenshot(str(out))
    return out


def test_playground_streams_previews_then_the_image_generate_gives(far_serve, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    import far_sdk

    url = far_serve.url
    d = browser
    d.get(url)
    wait = WebDriverWait(d, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) == 10)
    assert "far-demo" in d.find_element(By.ID, "bundle").text
    assert not d.find_element(By.ID, "prompt").is_displayed()  # a class bundle: the class picker, no prompt box
    Select(d.find_element(By.ID, "class")).select_by_value(str(CLASS))
    Select(d.find_element(By.ID, "preset")).select_by_value("fast")
    d.find_element(By.ID, "steps").send_keys(str(STEPS))
    seed = d.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys(str(SEED), Keys.ENTER)  # the keyboard submits the form
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#finals img"))

    frames = d.find_elements(By.CSS_SELECTOR, "#frames img")
    final = d.find_element(By.CSS_SELECTOR, "#finals img")
    order = [int(f.get_attribute("data-arrived")) for f in frames]
    assert len(frames) == STEPS >= 2
    assert order == sorted(order) and max(order) < int(final.get_attribute("data-arrived"))
    captions = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#frames figcaption")]
    assert captions[0].startswith(f"step 1/{STEPS}") and captions[-1].startswith(f"step {STEPS}/{STEPS}")
    assert f"seed {SEED}" in d.find_element(By.ID, "seeds").text
    assert "total" in d.find_element(By.ID, "timings").text

    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        want = gen.generate([CLASS], seed=SEED, num_steps=STEPS, preset="fast", output_type="np").images[0]
    got = _png(final.get_attribute("src"))
    np.testing.assert_array_equal(got, want)
    assert float(want.std()) > 1.0
    previews = [_png(f.get_attribute("src")) for f in frames]
    assert all(p.shape == want.shape for p in previews)
    assert not np.array_equal(previews[0], previews[-1])  # coarse first, then finer
    assert _screenshot(d, "playground.png", tmp_path).stat().st_size > 10_000

    d.set_window_size(390, 844)  # a phone: nothing wider than the screen
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    _screenshot(d, "playground-phone.png", tmp_path)


def test_far_serve_start_and_stop_logs_are_quiet_and_truthful(far_serve):
    """After the page test (module order): Ctrl-C stops the server with status 0, and what it printed is its own
    lines (plus Ray's own warnings), none of Ray Serve's confusing ones."""
    rc, out, err = far_serve.stop()
    assert rc == 0, (out, err)
    lines = out.splitlines()
    assert lines[0].startswith("far serve: starting") and lines[1].startswith(f"far serve: ready at {far_serve.url}")
    assert lines[-1] == "far serve: stopped", out
    for noise in ("will not be applied", "graceful_shutdown", "Traceback", "Started a local Ray", "Deployed app"):
        assert noise not in out + err, (noise, out, err)
