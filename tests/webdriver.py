"""A small WebDriver client (the W3C protocol, stdlib only) driving headless Chromium through chromedriver.

Enough for the dashboard's test and its screenshot: open a page, find elements
by CSS selector, click them, read their text, run a script, answer a prompt,
read the browser's log, take a screenshot, and send DevTools protocol commands
(chromedriver's `goog/cdp/execute`).
"""

import base64
import http.client
import json
import os
import re
import selectors
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import wait_until

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
HEADLESS_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
START_TIMEOUT = 20.0  # seconds for chromedriver to listen, then for the browser to start


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def find_chromedriver() -> str | None:
    return shutil.which("chromedriver")


class WebDriverError(Exception):
    def __init__(self, status: int, error: str, message: str):
        super().__init__(f"{error} ({status}): {message}")
        self.error = error


class Element:
    def __init__(self, browser: "Browser", element_id: str):
        self.browser, self.id = browser, element_id

    def click(self) -> None:
        self.browser.command("POST", f"/element/{self.id}/click", {})

    @property
    def text(self) -> str:
        return self.browser.command("GET", f"/element/{self.id}/text")

    def get_attribute(self, name: str) -> str | None:
        return self.browser.command("GET", f"/element/{self.id}/attribute/{name}")


class Browser:
    """One chromedriver process and one headless browser session; `close()` ends both."""

    def __init__(self, width: int = 1280, height: int = 900, chromium: str | None = None, chromedriver: str | None = None):
        chromium, chromedriver = chromium or find_chromium(), chromedriver or find_chromedriver()
        if not chromium or not chromedriver:
            raise FileNotFoundError("chromium and chromedriver are needed: run scripts/ensure-chromium")
        self.driver = subprocess.Popen([chromedriver, "--port=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.session: str | None = None
        try:
            self.port = _announced_port(self.driver, START_TIMEOUT)
            # whatever chromedriver prints from now on must not fill the pipe and stall it
            threading.Thread(target=_drain, args=(self.driver.stdout,), name="chromedriver-output", daemon=True).start()
            options = {"binary": chromium, "args": [*HEADLESS_ARGS, f"--window-size={width},{height}"]}
            # prompts stay open until the test answers them, instead of failing the next command
            capabilities = {
                "browserName": "chrome",
                "goog:chromeOptions": options,
                "unhandledPromptBehavior": "ignore",
                "goog:loggingPrefs": {"browser": "ALL"},  # for console()
            }
            answer = self._request("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
            self.session = answer["sessionId"]
            # the window's size is not the page's (headless Chromium keeps room for a window frame): set the page's
            self.cdp("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            try:
                self._request("DELETE", f"/session/{self.session}")
            except (OSError, WebDriverError):
                pass  # chromedriver is stopped below, and takes the browser with it
            self.session = None
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()

    # --- commands ---

    def command(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._request(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> Element:
        return Element(self, self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def find_all(self, css: str) -> list[Element]:
        found = self.command("POST", "/elements", {"using": "css selector", "value": css})
        return [Element(self, reference[ELEMENT]) for reference in found]

    def click(self, css: str, timeout: float = 5.0) -> None:
        """Click what `css` selects once it exists; again if the page replaced it in between."""
        self._retrying(lambda: self.find(css).click() or True, f"{css} to click", timeout)

    def text(self, css: str, timeout: float = 5.0) -> str:
        """The text of what `css` selects, once it exists."""
        return self._retrying(lambda: (self.find(css).text,), f"{css} to read", timeout)[0]

    def _retrying(self, action: Callable[[], Any], what: str, timeout: float) -> Any:
        def attempt():
            try:
                return action()
            except WebDriverError as error:
                if error.error in ("no such element", "stale element reference"):
                    return None
                raise

        return wait_until(attempt, what, timeout)

    def execute(self, script: str, *args: Any) -> Any:
        """Run `script` as a function body in the page; `arguments` holds `args`."""
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self) -> bytes:
        """What the page shows (width x height), as PNG."""
        return base64.b64decode(self.command("GET", "/screenshot"))

    def cdp(self, cmd: str, params: dict | None = None) -> Any:
        """A Chrome DevTools Protocol command, through chromedriver."""
        return self.command("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params or {}})

    def switch_to_frame(self, css: str | None) -> None:
        """Send the next commands to the frame `css` selects; None: back to the page."""
        target = None if css is None else {ELEMENT: self.find(css).id}
        self.command("POST", "/frame", {"id": target})

    def console(self) -> list[str]:
        """The messages the browser logged (console, security) since the last call."""
        return [entry["message"] for entry in self.command("POST", "/se/log", {"type": "browser"})]

    def alert_text(self) -> str | None:
        """The text of the open alert, confirm or prompt; None when none is open."""
        try:
            return self.command("GET", "/alert/text")
        except WebDriverError as error:
            if error.error == "no such alert":
                return None
            raise

    def accept_alert(self) -> None:
        """OK on the open alert, confirm or prompt."""
        self.command("POST", "/alert/accept", {})

    def answer_prompt(self, text: str) -> None:
        self.command("POST", "/alert/text", {"text": text})
        self.accept_alert()

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read() or b"{}")
        finally:
            connection.close()
        value = answer.get("value")
        if response.status != 200:
            value = value or {}
            raise WebDriverError(response.status, value.get("error", "unknown error"), value.get("message", "")[:2000])
        return value


def _announced_port(driver: subprocess.Popen, timeout: float) -> int:
    """The port chromedriver chose (`--port=0`), from the line it prints once it listens."""
    deadline = time.monotonic() + timeout
    output = b""
    with selectors.DefaultSelector() as selector:
        selector.register(driver.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(driver.stdout.fileno(), 4096)  # not readline(): its buffer would hide what select() sees
            if not chunk:
                raise RuntimeError(f"chromedriver exited (status {driver.wait()}) before listening: {output.decode(errors='replace')}")
            output += chunk
            announced = re.search(rb"started successfully on port (\d+)", output)
            if announced:
                return int(announced.group(1))
    raise RuntimeError(f"chromedriver did not listen within {timeout} s")


def _drain(stream) -> None:
    with stream:
        while stream.read(65536):
            pass
