"""The chat page at / in a real headless Chromium: a message typed into it gets a streamed answer.

Chromium is driven over the DevTools protocol (websocket-client): the text is typed with
Input.insertText and sent with an Enter key event, and a MutationObserver in the page records the
answer's length each time it changes, so the test sees it grow chunk by chunk before it is done.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from test_serve import Server, free_port

websocket = pytest.importorskip("websocket")
requests = pytest.importorskip("requests")


class DevTools:
    """A minimal Chrome DevTools Protocol session on one page."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=30)
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message.get("result", {})

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")


def test_typing_a_message_streams_an_answer(tmp_path):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    server = Server("--max-model-len", "512")
    port = free_port()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}"]  # fmt: skip
    browser = subprocess.Popen(
        [binary, *flags, server.url + "/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = [
                    t
                    for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                    if t["type"] == "page"
                ]
                if pages:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "chromium's DevTools endpoint did not come up"
            time.sleep(0.2)
        page = DevTools(pages[0]["webSocketDebuggerUrl"])
        while page.eval("document.readyState") != "complete" or not page.eval(
            "document.getElementById('model')?.textContent"
        ):
            assert time.monotonic() < deadline, "the page did not load the model name"
            time.sleep(0.1)
        page.eval("""window.lengths = [];
            new MutationObserver(() => { const a = document.querySelector('.msg.assistant');
              if (a) window.lengths.push(a.textContent.length); })
            .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            document.getElementById('max').value = 24; document.getElementById('temperature').value = 0;
            document.getElementById('input').focus();""")  # fmt: skip
        page.send("Input.insertText", text="Bonjour, comment vas-tu ?")
        for kind in ("keyDown", "keyUp"):
            page.send(
                "Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13
            )
        while page.eval("document.getElementById('send').disabled") or not page.eval("window.lengths.length"):
            assert time.monotonic() < deadline + 60, "no answer arrived"
            time.sleep(0.1)
        user = page.eval("document.querySelector('.msg.user').textContent")
        answer = page.eval("document.querySelector('.msg.assistant').textContent")
        lengths = page.eval("window.lengths")
        errors = page.eval("document.querySelectorAll('.msg.error').length")
    finally:
        browser.kill()
        browser.wait()
        server.stop()
    assert user == "Bonjour, comment vas-tu ?" and errors == 0
    assert answer and len(answer) == lengths[-1]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # it grew chunk by chunk
