"""The fleet dashboard in a real browser.

A real `rampart serve` (plain HTTP on loopback) over a webroot made with the CLI,
an admin token, a staged rollout, version checks and install reports sent as a
device would; then Debian's headless Chromium, driven over the Chrome DevTools
Protocol (a minimal WebSocket client below: no extra package), loads /admin/,
is sent to the login page, signs in through the form, reads the dashboard's DOM
and takes a full-page screenshot (written to $RAMPART_SCREENSHOT_DIR, default the
test's tmp dir, as rampart-dashboard.png).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rampart.server.rollout import in_rollout
from rampart.testbed import services
from tests.releases import build_payloads
from tests.server import httpkit
from tests.server.signing import file_device

RAMPART = str(Path(sys.executable).parent / "rampart")
CHROMIUM = "/usr/bin/chromium"
OS = "clipos"
WAIT = 30.0  # seconds: the bound of every wait in this file
FAILURE_TEXT = "efiboot: signature does not verify (key id 4F1A)"


def rampart(*argv: str | Path) -> str:
    result = subprocess.run(
        [RAMPART, *map(str, argv)], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert result.returncode == 0, f"rampart {argv}: {result.stderr}"
    return result.stdout


# --- the server -----------------------------------------------------------------------


@dataclass
class Live:
    port: int
    webroot: Path
    token: str
    log: Path
    keys: Path  # the machines' identity keys (admitted on first use)

    def signed(self, mid: str, running: str, kind: str, body: bytes = b"") -> dict[str, str]:
        device = file_device(self.keys / mid, mid)
        return {"clipos-machineid": mid, "clipos-version": running} | device.signed(
            kind, body, running
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        status, _, answer = httpkit.request(self.port, method, path, body, headers, timeout=WAIT)
        return status, answer

    def api(self, method: str, path: str, doc: object | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        body = None
        if doc is not None:
            body = json.dumps(doc).encode()
            headers["Content-Type"] = "application/json"
        status, data = self.request(method, path, body, headers)
        assert status in (200, 201), f"{method} {path}: {status} {data!r}"
        return json.loads(data)

    def check(self, mid: str, running: str) -> bytes:
        status, data = self.request(
            "GET", f"/update/v1/{OS}/version", headers=self.signed(mid, running, "version")
        )
        assert status == 200, data
        return data.split(b"\n")[0] + b"\n"  # the version line (the nonce after it)

    def report(self, mid: str, running: str, doc: dict[str, str]) -> None:
        body = json.dumps(doc).encode()
        headers = self.signed(mid, running, "report", body) | {"Content-Type": "application/json"}
        status, data = self.request("POST", f"/update/v1/{OS}/report", body, headers)
        assert (status, json.loads(data)) == (200, {"recorded": True, "authenticated": True}), data


def make_webroot(directory: Path) -> Path:
    """Keys and a webroot as in scripts/demo.sh: 1.0.0 on the default channel, 1.0.1
    published to the beta channel (so the default channel can roll 1.0.1 out)."""
    key, pub = directory / "vendor.key", directory / "vendor.pub"
    rampart("keygen", "--unencrypted", "--secret-key", key, "--public-key", pub)
    webroot = directory / "webroot"
    for version, channel in (("1.0.0", None), ("1.0.1", "beta")):
        core, efiboot = build_payloads(directory, version, core_size=200_000)
        argv: list[str | Path] = ["publish", "--webroot", webroot, "--os", OS]
        argv += ["--version", version, "--core", core, "--efiboot", efiboot, "--secret-key", key]
        if channel:
            argv += ["--channel", channel]
        rampart(*argv)
    return webroot


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    webroot = make_webroot(tmp_path)
    token = json.loads(rampart("token", "create", "ops", "--webroot", webroot, "--json"))["token"]
    rampart("machine", "admission", "first-use", "--webroot", webroot)
    log = tmp_path / "serve.log"
    # Ready when it answers; the login page touches no cache (a version check would
    # load the channel cache before the test changes the channels).
    with services.RampartServe(webroot, log, ready_path="/admin/login", timeout=WAIT) as server:
        yield Live(server.port, webroot, token, log, tmp_path / "keys")


# --- a minimal Chrome DevTools Protocol client (RFC 6455 WebSocket, text frames) -------


class DevTools:
    """One WebSocket connection to the browser; page sessions are flattened into it."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split()[1] == "101", f"DevTools handshake refused: {lines[0]}"
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()  # noqa: S324 - RFC 6455
        assert f"sec-websocket-accept: {accept.lower()}" in (line.lower() for line in lines)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("DevTools connection closed")
        return data

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _message(self) -> dict[str, Any]:
        parts: list[bytes] = []
        while True:
            first, second = self._exact(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            mask = self._exact(4) if second & 0x80 else b""
            payload = self._exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("DevTools connection closed by the browser")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    doc: dict[str, Any] = json.loads(b"".join(parts))
                    return doc

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        request: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            request["sessionId"] = session
        self._send_frame(0x1, json.dumps(request).encode())
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            message = self._message()
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)
        raise TimeoutError(f"DevTools: no answer to {method}")

    def close(self) -> None:
        self.sock.close()


class Page:
    def __init__(self, devtools: DevTools) -> None:
        self.devtools = devtools
        target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=1200,
            height=800,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.devtools.call(method, self.session, **params)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait_for(self, path: str, selector: str) -> None:
        """Until the page at `path` has loaded and holds `selector` (bounded)."""
        probe = (
            f"location.pathname === {json.dumps(path)} && document.readyState === 'complete'"
            f" && document.querySelector({json.dumps(selector)}) !== null"
        )
        deadline = time.monotonic() + WAIT
        while not self.eval(probe):
            assert time.monotonic() < deadline, (
                f"page never showed {selector} at {path}: {self.eval('location.href')}"
            )
            time.sleep(0.1)

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        assert "errorText" not in result, f"{url}: {result['errorText']}"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run make setup")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log = tmp_path / "chromium.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium")),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its helpers end with it
        )
    devtools = None
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            assert proc.poll() is None, f"chromium exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no DevToolsActivePort: {log.read_text()}"
            time.sleep(0.1)
        port, path = active.read_text().splitlines()[:2]
        devtools = DevTools(int(port), path)
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=WAIT)


# --- PNG -------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """Check a PNG whole (signature, chunk CRCs, IHDR, image data size, IEND) and
    that it is not blank; return (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, idat = 8, [], b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack("!I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack("!I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack("!IIBB", body[:10])
            assert depth == 8, depth
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
        elif kind == b"IDAT":
            idat += body
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", chunks
    assert width > 0 and height > 0
    pixels = zlib.decompress(idat)
    assert len(pixels) == height * (1 + width * channels), "image data of the wrong size"
    assert len(set(pixels)) > 3, "a blank image"
    return width, height


# --- the test --------------------------------------------------------------------------


def pick(version: str, percent: float, inside: bool, count: int, prefix: str) -> list[str]:
    """`count` machine ids that are (or are not) in a rollout of `version` at `percent`."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        mid = f"{prefix}{n:030x}"
        if in_rollout(mid, version, percent) == inside:
            found.append(mid)
        n += 1
    return found


def test_dashboard_in_chromium(tmp_path: Path, live: Live, browser: DevTools) -> None:
    base = f"http://127.0.0.1:{live.port}"

    # Administration through the API: a 25 % rollout of 1.0.1 on the default channel
    # (stable, bootstrapped at 1.0.0), and two machines on the beta channel.
    assert live.request("GET", "/admin/api/channels")[0] == 401
    channels = {c["name"]: c for c in live.api("GET", "/admin/api/channels")}
    assert channels["stable"]["version"] == "1.0.0" and channels["stable"]["is_default"]
    assert channels["beta"]["version"] == "1.0.1"
    rollout = {"version": "1.0.1", "percent": 25}
    state = live.api("POST", f"/admin/api/channels/{OS}/stable/rollout", rollout)
    assert (state["rollout_version"], state["rollout_state"]) == ("1.0.1", "active")
    beta = pick("1.0.1", 25, False, 2, "bb")
    for mid in beta:
        live.api("PUT", f"/admin/api/machines/{mid}/channel", {"os": OS, "channel": "beta"})

    # Devices check in: 2 stable machines fall in the rollout, 6 do not.
    offered, others = pick("1.0.1", 25, True, 2, "aa"), pick("1.0.1", 25, False, 6, "cc")
    for mid in offered:
        assert live.check(mid, "1.0.0") == b'version = "1.0.1"\n'
    for mid in others:
        assert live.check(mid, "1.0.0") == b'version = "1.0.0"\n'
    for mid in beta:
        assert live.check(mid, "1.0.1") == b'version = "1.0.1"\n'
    # One installs 1.0.1 and checks in again running it; the other fails.
    success = {"from": "1.0.0", "to": "1.0.1", "outcome": "success", "error": ""}
    live.report(offered[0], "1.0.0", success)
    assert live.check(offered[0], "1.0.1") == b'version = "1.0.1"\n'
    failure = {"from": "1.0.0", "to": "1.0.1", "outcome": "failure", "error": FAILURE_TEXT}
    live.report(offered[1], "1.0.0", failure)

    # Checks are written in batches: wait until all 11 are in the database.
    deadline = time.monotonic() + WAIT
    while (view := live.api("GET", "/admin/api/fleet"))["counts"].get("checks") != 11:
        assert time.monotonic() < deadline, view["counts"]
        time.sleep(0.1)
    fleet = json.loads(rampart("fleet", "--webroot", live.webroot, "--json"))
    assert fleet["machines"] == 10
    assert fleet["counts"] == {
        "checks": 11,
        "machines": 10,
        "reports_success": 1,
        "reports_failure": 1,
        "anonymous_checks": 0,
        "anonymous_machines": 0,
        "anonymous_reports": 0,
    }
    bars = [(r["channel"], r["version"], r["machines"]) for r in fleet["versions"]]
    assert bars == [("beta", "1.0.1", 2), ("stable", "1.0.0", 7), ("stable", "1.0.1", 1)]

    page = Page(browser)

    # (a) No cookie: /admin/ sends the browser to the login page.
    page.navigate(f"{base}/admin/")
    page.wait_for("/admin/login", "form input[name=token]")
    assert page.eval("document.querySelector('input[name=token]').type") == "password"
    assert page.eval("document.cookie") == ""

    # (b) A wrong token is refused; the right one, typed into the form, signs in.
    fill = (
        "document.querySelector('input[name=token]').value = {};"
        "document.querySelector('form').submit()"
    )
    page.eval(fill.format(json.dumps("rpt_not-a-token")))
    page.wait_for("/admin/login", "p.bad")
    assert page.eval("document.querySelector('p.bad').textContent") == "Invalid token."
    page.eval(fill.format(json.dumps(live.token)))
    page.wait_for("/admin/", "table#channels")

    cookies = {
        c["name"]: c for c in page.call("Network.getCookies", urls=[base + "/admin/"])["cookies"]
    }
    cookie = cookies["rampart_admin"]
    assert cookie["value"].startswith("rps_") and live.token not in cookie["value"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert page.eval("document.cookie") == ""  # HttpOnly: no script sees it

    dom = page.eval("document.documentElement.outerHTML")
    table = page.eval(
        "[...document.querySelectorAll('#channels tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    assert table == [
        ["os", "channel", "target", "rollout"],
        [OS, "beta", "1.0.1", "—"],
        [OS, "stable (default)", "1.0.0", "1.0.1 to 25 % (active)"],
    ]
    assert "1.0.1 to 25 %" in dom
    assert page.eval("document.getElementById('machines').textContent") == "10"
    assert page.eval("document.getElementById('checks').textContent") == "11"
    cards = page.eval("[...document.querySelectorAll('.card')].map(c => c.textContent)")
    assert cards == [
        "machines10",
        "checks11",
        "successful installs1",
        "failed installs1",
        "anonymous checks (not counted)0",
    ]
    failures = page.eval(
        "[...document.querySelectorAll('#failures tr')].slice(1)"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    assert len(failures) == 1
    assert failures[0][:3] == [offered[1], "1.0.0 → 1.0.1", FAILURE_TEXT]
    assert FAILURE_TEXT in dom
    seen = page.eval(
        "[...document.querySelectorAll('#last-seen tr')].slice(1).map(r => r.cells[0].textContent)"
    )
    assert sorted(seen) == sorted(offered + others + beta)

    # The chart: an inline SVG, one bar (rect) and one label per (channel, version).
    assert page.eval("document.querySelectorAll('svg').length") == 1
    chart = page.eval(
        "[...document.querySelectorAll('svg rect')].map(r => ["
        "r.previousElementSibling.textContent, r.querySelector('title').textContent,"
        "r.getBBox().width])"
    )
    assert [row[:2] for row in chart] == [
        [f"{channel} · {version}", f"{machines} machines"] for channel, version, machines in bars
    ]
    widths = [row[2] for row in chart]
    assert widths[1] == max(widths) and all(w > 0 for w in widths)  # 7 machines: longest
    assert widths[0] == pytest.approx(2 * widths[2], rel=0.01)  # proportional

    # (c) A full-page screenshot.
    size = page.call("Page.getLayoutMetrics")["cssContentSize"]
    shot = page.call(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
    )
    data = base64.b64decode(shot["data"])
    directory = Path(os.environ.get("RAMPART_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    screenshot = directory / "rampart-dashboard.png"
    screenshot.write_bytes(data)
    width, height = png_size(screenshot.read_bytes())
    assert (width, height) == (round(size["width"]), round(size["height"]))
    assert height > 600  # the whole page, not only the viewport's top
