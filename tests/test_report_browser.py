"""The run report in a real browser: headless Chromium opens report.html of a tiny demo-like run (training with
evaluation, then `preftune eval` as the demo does) and checks what a person would see.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending in a NUL
byte on file descriptors 3 and 4), with the standard library only. The protocol reports the page's console
messages, exceptions and network requests as they happen, evaluates expressions in the page without adding a
script to the report, and takes screenshots. A control page with a console error and a broken image checks that
these checks can fail.

Needs /usr/bin/chromium (Debian: `apt-get install -y chromium`); skipped without it.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from preftune.cli import main

from toy import counting_pairs, save_model_folder, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]
WIDTH, HEIGHT = 1280, 800  # the first screen of a laptop
TIMEOUT = 30.0  # seconds for any one protocol answer

pytestmark = [
    pytest.mark.slow,  # a training run, an evaluation and a browser: about 10 s on 2 cores
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium)"),
]

REWARD_MODULE = '''
def score(texts):
    """Counts the digits of a text: a reward a test can reason about."""
    return [float(sum(word.isdigit() for word in text.split())) for text in texts]
'''

# Evaluated in the page (not part of it): every image's decoding and layout, the headline's place and text.
INSPECT = """
(async () => {
  const images = await Promise.all([...document.images].map(async (img) => {
    let decoded = true;
    try { await img.decode(); } catch (e) { decoded = false; }
    const box = img.getBoundingClientRect(), style = getComputedStyle(img);
    return {alt: img.alt, decoded, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
            width: box.width, height: box.height, display: style.display, visibility: style.visibility,
            attrWidth: img.getAttribute("width")};
  }));
  const headline = document.getElementById("headline");
  const box = headline ? headline.getBoundingClientRect() : null;
  return {images, title: document.title,
          headline: headline ? {text: headline.innerText, top: box.top, bottom: box.bottom,
                                left: box.left, right: box.right} : null,
          scripts: document.scripts.length};
})()
"""


class Chromium:
    """One headless Chromium; `inspect(url)` opens a page in a fresh tab and reports what happened."""

    def __init__(self, profile: Path):
        commands_r, self._commands = os.pipe()
        self._answers, answers_w = os.pipe()

        def descriptors():  # in the child: the protocol's ends on fds 3 (commands) and 4 (answers)
            a, b = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 10), fcntl.fcntl(answers_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = open(profile / "chromium.log", "wb")
        self.process = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=descriptors,
            close_fds=False,
            stdout=self.log,
            stderr=self.log,
        )
        os.close(commands_r)
        os.close(answers_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._answers)
        self.log.close()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        answer = self.wait_for(lambda m, i=self._id: m.get("id") == i)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def wait_for(self, matches) -> dict:
        """The first message that `matches`; the others are kept in `events`."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if matches(message):
                    return message
                self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the protocol pipe")
            self._buffer += chunk

    def inspect(self, url: str) -> dict:
        """Load `url` at 1280 × 800 and return its console messages, errors, requests, image and headline
        facts, and a screenshot of the first screen."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable", session=session)
        metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics, session)
        self.events = []
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
        facts = self.send(
            "Runtime.evaluate", {"expression": INSPECT, "awaitPromise": True, "returnByValue": True}, session
        )["result"]["value"]
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        mine = [e for e in self.events if e.get("sessionId") == session]
        self.send("Target.closeTarget", {"targetId": target})
        return {
            **facts,
            "screenshot": base64.b64decode(shot),
            "console": [e["params"] for e in mine if e.get("method") == "Runtime.consoleAPICalled"],
            "exceptions": [e["params"] for e in mine if e.get("method") == "Runtime.exceptionThrown"],
            "log": [
                e["params"]["entry"]
                for e in mine
                if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning")
            ],
            "requests": [e["params"]["request"]["url"] for e in mine if e.get("method") == "Network.requestWillBeSent"],
            "failed": [e["params"] for e in mine if e.get("method") == "Network.loadingFailed"],
        }


@pytest.fixture(scope="module")
def browser():
    with tempfile.TemporaryDirectory(prefix="preftune-chromium-") as profile:
        chromium = Chromium(Path(profile))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny run as `preftune demo` makes one: training with held-out pairs and sampled prompts scored by a
    reward, then `preftune eval` of final/ against the starting model into eval.json, then the report."""
    root = tmp_path_factory.mktemp("browser")
    (root / "toy_reward.py").write_text(REWARD_MODULE, encoding="utf-8")
    model = str(save_model_folder(root / "model"))
    train = str(write_jsonl(counting_pairs(48, seed=1), root / "train.jsonl"))
    held = str(write_jsonl(counting_pairs(16, seed=2), root / "eval.jsonl"))
    prompts = str(write_jsonl([{"prompt": f"count from {i} :"} for i in range(8)], root / "prompts.jsonl"))
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        train_args = ["--model", model, "--data", train, "--eval-data", held, "--output", str(out)]
        train_args += ["--batch-size", "8", "--max-steps", "6", "--learning-rate", "1e-3", "--eval-every", "3"]
        train_args += ["--eval-prompts", prompts, "--eval-reward", "toy_reward:score", "--eval-max-new-tokens", "6"]
        assert main(["train", *train_args]) == 0
        eval_args = ["--model", str(out / "final"), "--ref", model, "--data", held, "--prompts", prompts]
        eval_args += ["--reward", "toy_reward:score", "--max-new-tokens", "6", "--json", str(out / "eval.json")]
        assert main(["eval", *eval_args]) == 0
    assert main(["report", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def seen(browser, demo_run):
    return browser.inspect((demo_run / "report.html").resolve().as_uri())


def test_page_loads_without_console_errors_or_outside_requests(seen, demo_run):
    assert seen["title"] == "preftune report: run"
    assert seen["console"] == [] and seen["exceptions"] == [] and seen["log"] == [] and seen["failed"] == []
    assert seen["scripts"] == 0
    # Self-contained: the only request is the page itself (embedded images are data: URLs, not fetched).
    assert [u for u in seen["requests"] if not u.startswith("data:")] == [(demo_run / "report.html").as_uri()]


def test_every_plot_decodes_and_is_displayed(seen, demo_run):
    html = (demo_run / "report.html").read_text(encoding="utf-8")
    images = seen["images"]
    assert len(images) == html.count('src="data:image/png;base64,') >= 9  # 8 training groups + length chart
    for img in images:
        assert img["decoded"], img["alt"]
        assert img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img["alt"]
        assert img["width"] > 0 and img["height"] > 0, img["alt"]  # laid out: displayed, not collapsed
        assert img["display"] != "none" and img["visibility"] == "visible", img["alt"]
        assert int(img["attrWidth"]) == img["naturalWidth"], img["alt"]  # the size the page reserves is the PNG's
    alts = [img["alt"] for img in images]
    assert "Held-out accuracy and margin by response length" in alts and "Loss" in alts


def test_first_screen_holds_the_headline(seen, demo_run):
    from matplotlib.image import imread

    evaluation = json.loads((demo_run / "eval.json").read_text(encoding="utf-8"))
    headline = seen["headline"]
    assert headline is not None and 0 <= headline["top"] < headline["bottom"] <= HEIGHT  # all of it, unscrolled
    text = headline["text"]
    accuracy = evaluation["pairs"]["rewards/accuracies"]
    win_rate = evaluation["generation"]["win_rate"]["win_rate"]
    assert f"{100 * accuracy:.1f}%" in text and f"{100 * win_rate:.1f}%" in text
    for title in ("HELD-OUT ACCURACY", "REWARD BEFORE → AFTER", "KL TO THE REFERENCE", "WIN RATE VS REFERENCE"):
        assert title in text.upper()
    assert "nats" in text and "95% CI" in text
    assert "No warnings" in text or "step " in text  # the monitor's verdict, either way

    pixels = imread(io.BytesIO(seen["screenshot"]), format="png")
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    top, bottom = int(headline["top"]), int(headline["bottom"])
    left, right = int(headline["left"]), int(headline["right"])
    region = pixels[top:bottom, left:right, :3]
    luminance = region @ [0.299, 0.587, 0.114]
    assert (luminance < 0.35).mean() > 0.01  # text is drawn there ...
    assert (abs(region - region[0, 0]).sum(axis=2) > 0.05).mean() > 0.05  # ... on more than one flat colour


def test_the_checks_can_fail(browser, tmp_path):
    # A control page: the same inspection must see a console error, a thrown error and an image that does not
    # decode, and no headline.
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>x</p><img alt='broken' src='data:image/png;base64,AAAA'>"
        "<script>console.error('boom'); throw new Error('thrown');</script></body></html>",
        encoding="utf-8",
    )
    seen = browser.inspect(bad.as_uri())
    assert [c["type"] for c in seen["console"]] == ["error"]
    assert len(seen["exceptions"]) == 1
    assert seen["images"][0]["decoded"] is False and seen["images"][0]["naturalWidth"] == 0
    assert seen["headline"] is None
