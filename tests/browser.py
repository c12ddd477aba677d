"""A tiny Chrome DevTools Protocol driver over aiohttp: headless Debian Chromium, no downloads."""
from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp

from streams.local.stack import free_port

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900"]


class Browser:
    def __init__(self, profile: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["chromium", *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={self.port}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.console: list[str] = []
        self.errors: list[str] = []
        self._id = 0

    def _page_ws(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                targets = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/json", timeout=1).read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("chromium's DevTools endpoint did not come up")

    async def _call(self, ws, method: str, **params):
        self._id += 1
        my_id = self._id
        await ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = json.loads((await ws.receive()).data)
            self._observe(msg)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _observe(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params['type']}: {text}")
            if params["type"] in ("error", "assert"):
                self.errors.append(text)
        elif method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"].get("text", ""))

    async def _session(self, url: str, reads: list[tuple[float, str]], screenshot: Path):
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(self._page_ws(), max_msg_size=50_000_000) as ws:
                for domain in ("Runtime", "Log", "Page"):
                    await self._call(ws, f"{domain}.enable")
                await self._call(ws, "Page.navigate", url=url)
                values = []
                for wait_s, expression in reads:
                    end = time.monotonic() + wait_s
                    while time.monotonic() < end:  # keep draining events while waiting
                        try:
                            self._observe(json.loads((await ws.receive(timeout=0.2)).data))
                        except asyncio.TimeoutError:
                            pass
                    result = await self._call(ws, "Runtime.evaluate", expression=expression,
                                              returnByValue=True)
                    values.append(result["result"].get("value"))
                shot = await self._call(ws, "Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                return values

    def visit(self, url: str, reads: list[tuple[float, str]], screenshot: Path) -> list:
        """Load `url`; after each (wait, JS expression) evaluate it; then take a screenshot."""
        return asyncio.run(self._session(url, reads, screenshot))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
