"""The smoke report as a reader opens it: headless Chromium (Debian's `chromium`), driven over the DevTools protocol
through a pipe (`--remote-debugging-pipe`: no port, no extra package), on a 1280×800 laptop viewport.

It checks what a reader sees: no console error, every figure decoded, the run's facts, the claims table and the
headline figure without scrolling, the detail collapsed, a table of contents that reaches every section, no request
leaving the page, the detail printed, dark mode readable. Skipped (with the reason) only where no Chromium is
installed; under CI=true a missing browser fails, since the README's test setup installs it.

LORASUM_REPORT_SCREENSHOT=docs/report-top.png refreshes the screenshot of the top of the page kept in docs/.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import write_smoke_domains
from lorasum.cli.main import main

WIDTH, HEIGHT = 1280, 800
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--remote-debugging-pipe")
COLLAPSED = ("Table 2", "Each fundamental block vs the sum of the others", "Table 5", "Weight space")


def find_browser() -> str | None:
    named = os.environ.get("LORASUM_CHROMIUM")
    if named:
        return named
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
                 if p), None)


class Chromium:
    """One headless Chromium; `call` sends a DevTools command and returns its result, keeping every event seen."""

    def __init__(self, exe: str, profile: Path):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def fds_3_and_4():  # the protocol pipe: Chromium reads commands on fd 3 and writes replies on fd 4
            a, b = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
                                      "about:blank"], preexec_fn=fds_3_and_4, close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.events: list[dict] = []
        self._buf, self._id, self.session = b"", 0, None

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message(deadline))

    def js(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:60]}...: {out['exceptionDetails']}")
        return out["result"].get("value")

    def open(self, url: str) -> None:
        """A fresh page at 1280×800 with the console, log and network watched, loaded and idle."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)

    def problems(self, since: int = 0) -> tuple[list[str], list[str]]:
        """(console errors and uncaught exceptions, URLs requested) among the events seen so far (from `since`)."""
        errors, urls = [], []
        for e in self.events[since:]:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append(f"{d.get('text', '')} {(d.get('exception') or {}).get('description', '')}".strip())
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(p["entry"]["text"])
            elif e.get("method") == "Network.requestWillBeSent":
                urls.append(p["request"]["url"])
        return errors, urls


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_browser()
    if exe is None:
        reason = ("no Chromium found (install Debian's `chromium`, as `bash .ci/run` does, or set LORASUM_CHROMIUM "
                  "to a Chromium or Chrome binary)")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    b = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    """The smoke preset's report (three tiny domains), open in the browser; `page.url` is the file it shows."""
    root = tmp_path_factory.mktemp("browser_report")
    data = write_smoke_domains(root / "data")
    assert main(["experiment", "--preset", "smoke", "--domains", "alpha", "beta", "gamma", "--data-dir", str(data),
                 "--out", str(root / "run")]) == 0
    browser.url = (root / "run" / "report.html").resolve().as_uri()
    browser.open(browser.url)
    return browser


def _inside(rect: dict) -> bool:
    return rect["top"] >= 0 and rect["left"] >= 0 and rect["bottom"] <= HEIGHT and rect["right"] <= WIDTH \
        and rect["width"] > 0 and rect["height"] > 0


RECT = "(e => { const r = e.getBoundingClientRect(); return {top: r.top, left: r.left, bottom: r.bottom, " \
       "right: r.right, width: r.width, height: r.height}; })"


def test_the_answer_is_on_the_first_screen_and_every_figure_decodes(page):
    images = page.js("Promise.all([...document.images].map(i => i.decode().then(() => [i.alt, i.naturalWidth, "
                     "i.naturalHeight], () => [i.alt, 0, 0])))")
    assert len(images) >= 4, images  # the headline figure and the three others
    for alt, w, h in images:
        assert w > 0 and h > 0, f"figure not decoded: {alt[:60]}"
        assert len(alt) > 40 and "_" not in alt.split()[0], f"alt text says too little: {alt!r}"
    assert page.js("scrollX + scrollY") == 0
    facts = page.js(f"{RECT}(document.querySelector('header dl'))")
    claims = page.js(f"{RECT}(document.querySelector('section table.claims'))")
    headline = page.js(f"{RECT}(document.querySelector('section.lead figure img'))")
    for name, rect in (("run facts", facts), ("claims table", claims), ("headline figure", headline)):
        assert _inside(rect), f"{name} not within the first {WIDTH}x{HEIGHT} screen: {rect}"
    assert headline["width"] >= 380, headline  # big enough to read, not a thumbnail
    text = page.js("document.querySelector('header dl').innerText")
    for fact in ("model", "tiny-gpt2", "domains", "alpha, beta, gamma", "seeds", "init", "records", "time"):
        assert fact in text, f"run facts miss {fact!r}: {text!r}"
    badges = page.js("[...document.querySelectorAll('table.claims .badge')].map(b => [b.textContent, b.className, "
                     "getComputedStyle(b).backgroundColor])")
    assert len(badges) == 5 and {c.split()[1] for _, c, _ in badges} <= {"yes", "no", "open"}, badges
    assert all(bg not in ("rgba(0, 0, 0, 0)", "transparent") for _, _, bg in badges), badges
    assert page.js("document.documentElement.scrollWidth") <= WIDTH  # no sideways scrolling
    if os.environ.get("LORASUM_REPORT_SCREENSHOT"):
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        Path(os.environ["LORASUM_REPORT_SCREENSHOT"]).write_bytes(base64.b64decode(shot))


def test_detail_is_collapsed_behind_a_summary_and_the_contents_reach_every_section(page):
    details = page.js("[...document.querySelectorAll('details')].map(d => ({open: d.open, heading: "
                      "d.querySelector('summary h2').textContent, summary: d.querySelector('summary .sum').textContent, "
                      "tables: d.querySelectorAll('table').length, shown: [...d.querySelectorAll('table')].filter(t => "
                      "t.checkVisibility()).length}))")
    headings = [d["heading"] for d in details]
    for want in COLLAPSED:
        assert any(h.startswith(want) for h in headings), f"no collapsed section '{want}' in {headings}"
    for d in details:
        assert not d["open"] and d["tables"] > 0 and d["shown"] == 0, d
        assert any(ch.isdigit() for ch in d["summary"]), f"summary without a number: {d}"
    order = page.js("[...document.querySelectorAll('main > section')].map(s => [s.id, "
                    "s.querySelector('h2').textContent, !!s.querySelector('details')])")
    heads = [h for _, h, _ in order]
    assert heads[0] == "Claims of the paper" and heads[1].startswith("Table 3") and heads[2].startswith("Table 4"), heads
    first_detail = next(i for i, (_, _, collapsed) in enumerate(order) if collapsed)
    assert heads.index("Figures") < first_detail and all(c for _, _, c in order[first_detail:]), heads
    links = page.js("[...document.querySelectorAll('nav a')].map(a => a.getAttribute('href'))")
    assert links == [f"#{i}" for i, _, _ in order]
    page.js("document.querySelector('nav a[href=\"#findings\"]').click(), 0")
    assert abs(page.js("document.getElementById('findings').getBoundingClientRect().top")) < 2  # the link scrolls there
    page.js("scrollTo(0, 0), 0")


def test_no_console_error_and_no_request_leaves_the_page(page):
    errors, urls = page.problems()
    assert not errors, errors
    assert page.url in urls  # the watch works: it saw the page itself
    assert all(u == page.url or u.startswith("data:") for u in urls), [u[:80] for u in urls]


def test_print_shows_the_detail_and_dark_mode_stays_readable(page):
    def luminance(rgb: str) -> float:
        r, g, b = (int(x) / 255 for x in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    shown = "[...document.querySelectorAll('details table')].filter(t => t.checkVisibility()).length"
    hidden_nav = "getComputedStyle(document.querySelector('nav')).display"
    page.call("Emulation.setEmulatedMedia", media="print")
    try:
        assert page.js(shown) == page.js("document.querySelectorAll('details table').length") > 0
        assert page.js(hidden_nav) == "none"
        pdf = base64.b64decode(page.call("Page.printToPDF", timeout=60)["data"])
        assert pdf[:5] == b"%PDF-" and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") > 3
        page.call("Emulation.setEmulatedMedia", media="screen",
                  features=[{"name": "prefers-color-scheme", "value": "dark"}])
        colours = page.js("[document.documentElement, document.querySelector('td .ci'), document.querySelector("
                          "'.cap')].map(e => getComputedStyle(e).color).concat([getComputedStyle("
                          "document.documentElement).backgroundColor])")
        fg, ci, cap, bg = map(luminance, colours)
        assert bg < 0.15 and fg > 0.7 and ci > 0.3 and cap > 0.3, colours
    finally:
        page.call("Emulation.setEmulatedMedia", media="", features=[])


def test_the_watch_sees_a_request_and_an_error(browser, tmp_path):
    """The checks above can fail: a page without the report's policy that loads a remote image and throws."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><img src='http://127.0.0.1:9/x.png'><p>x</p><body onload='undefined_fn()'>")
    seen = len(browser.events)
    browser.open(bad.as_uri())
    time.sleep(0.3)
    browser.js("0")  # drain the events queued meanwhile
    errors, urls = browser.problems(since=seen)
    assert any("undefined_fn" in e for e in errors), errors
    assert "http://127.0.0.1:9/x.png" in urls, urls
