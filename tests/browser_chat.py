"""Drive minillm.serve's chat page in headless Chromium (Debian's `chromium`): load it, send a message, wait
for the streamed reply, take a screenshot. Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages ending in NUL on file descriptors 3 and 4), so no driver package is
needed. tests/test_serve.py uses it; run alone, it takes the README's screenshot of a running server:

    python -m minillm.serve --model runs/demo/orpo/model --port 8000 &
    python tests/browser_chat.py --url http://127.0.0.1:8000/ --message "Tõlgi inglise keelde: punane kass" \\
        --out docs/chat_page.png
"""
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minillm.options import cli, parse_options  # noqa: E402 -- run as a script, the repository is put on the path first

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class Browser:
    """A headless Chromium and one page of it, spoken to over the DevTools pipe."""

    def __init__(self, width: int = 900, height: int = 600):
        self.profile = tempfile.TemporaryDirectory()
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def give_fds():  # in the child: the pipe ends at the numbers Chromium expects, left open across exec
            reader, writer = os.dup(to_chrome_r), os.dup(from_chrome_w)  # the pipes may sit at 3 and 4 already
            os.dup2(reader, 3)
            os.dup2(writer, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.process = subprocess.Popen(
            [find_chromium(), "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
             f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=give_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id, self.buffer, self.session = 0, b"", None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        """Send one DevTools command and return its result (events in between are skipped)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                data = os.read(self.from_chrome, 1 << 16)
                if not data:
                    raise RuntimeError(f"chromium closed the DevTools pipe during {method}")
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout:.0f} s for: {expression}")

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)
        self.profile.cleanup()


def chat_on_page(url: str, message: str | list[str], screenshot: str | Path | None = None,
                 temperature: float | None = None, max_tokens: int | None = None) -> dict:
    """Open the chat page, send `message` (or each message of a list: a conversation), wait until each reply
    has streamed in. Returns what the page shows: {"model", "layout", "reply" (the last; None when none
    came), "updates" (how many times the replies grew while streaming), "bubbles" (every message and error
    shown)}."""
    browser = Browser()
    try:
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.body && document.body.dataset.state === 'idle'")
        settings = ""
        if temperature is not None:
            settings += f"document.getElementById('temperature').value = '{temperature}';"
        if max_tokens is not None:
            settings += f"document.getElementById('max-tokens').value = '{max_tokens}';"
        # Count the replies' text changes as they happen: a streamed reply grows piece by piece.
        browser.js(settings + """
            window.replyUpdates = 0;
            new MutationObserver((records) => { window.replyUpdates += records.length; })
                .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});""")
        for text in [message] if isinstance(message, str) else message:  # one turn after another
            browser.js("document.getElementById('input').value = %s; document.getElementById('form').requestSubmit();"
                       % json.dumps(text))
            browser.wait_for("document.body.dataset.state === 'idle'")  # 'streaming' from the submit on
        shown = browser.js("""({
            model: document.getElementById('model-name').textContent,
            layout: document.getElementById('layout').textContent,
            reply: [...document.querySelectorAll('.msg.assistant')].map((m) => m.textContent).pop() || null,
            updates: window.replyUpdates,
            bubbles: [...document.querySelectorAll('.msg')].map((m) => m.className + ': ' + m.textContent)})""")
        if screenshot is not None:
            png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            Path(screenshot).write_bytes(png)
        return shown
    finally:
        browser.close()


@dataclass(kw_only=True)
class ScreenshotOptions:
    url: str = "http://127.0.0.1:8000/"  # the running server's address
    message: list[str] = dataclasses.field(default_factory=lambda: ["Tõlgi inglise keelde: punane kass"])  # what to send, one turn each
    out: str = "docs/chat_page.png"  # the screenshot (PNG)
    temperature: float = 0.0  # the page's temperature control while sending


@cli
def main(argv=None):
    args = parse_options(ScreenshotOptions, argv, prog="python tests/browser_chat.py")
    if find_chromium() is None:
        raise OSError("no chromium on PATH (Debian: apt-get install chromium)")
    shown = chat_on_page(args.url, args.message, args.out, temperature=args.temperature)
    print(json.dumps(shown, ensure_ascii=False, indent=1))
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
