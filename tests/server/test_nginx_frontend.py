"""The deployment of docs/server.md, for real: Debian's nginx terminates TLS, serves
the webroot's dist/ itself (range requests included) and proxies the rest to a
`rampart serve` subprocess.

The nginx configuration is the one printed in docs/server.md (the block with
`upstream rampart`), with loopback addresses, test certificates and temporary
paths substituted, inside a minimal main configuration whose pid file, logs and
temporary paths all live in the test's directory.
"""

from __future__ import annotations

import gc
import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from tuf.ngclient import Updater, UpdaterConfig

from rampart.contracts import tuf
from rampart.testbed import services
from tests.conftest import KeyPair, make_keypair, run_cli
from tests.device.conftest import make_device
from tests.releases import build_payloads
from tests.server import httpkit
from tests.server.signing import file_device
from tests.tufkit import PASSWORD, TufRepo

RAMPART = str(Path(sys.executable).parent / "rampart")
DOC = Path(__file__).resolve().parents[2] / "docs" / "server.md"
OS = "clipos"
WAIT = 30.0  # seconds: the bound of every wait in this file
MID = "5" * 32


def rampart(*argv: str | Path) -> str:
    result = subprocess.run(
        [RAMPART, *map(str, argv)], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert result.returncode == 0, f"rampart {argv}: {result.stderr}"
    return result.stdout


# --- the configuration from the documentation ------------------------------------------


def documented_config() -> str:
    blocks = re.findall(r"```nginx\n(.*?)```", DOC.read_text(), re.DOTALL)
    found = [b for b in blocks if "upstream rampart" in b]
    assert len(found) == 1, f"{DOC}: expected one ```nginx block with `upstream rampart`"
    return str(found[0])


def adapt(
    config: str,
    *,
    port: int,
    app_ports: Sequence[int],
    cert: Path,
    key: Path,
    dist: Path,
    state: Path,
) -> str:
    """The documented configuration with this test's addresses and paths: its upstream
    app servers become `app_ports` on loopback (as many as the example lists, at most)."""
    out: list[str] = []
    done: dict[str, int] = {}
    in_upstream = False
    for line in config.splitlines():
        words = line.split()
        directive = words[0] if words else ""
        indent = line[: len(line) - len(line.lstrip())]
        if directive == "upstream":
            in_upstream = True
        elif in_upstream and directive == "}":
            in_upstream = False
        replacement = {
            "listen": f"listen 127.0.0.1:{port} ssl;",
            "ssl_certificate": f"ssl_certificate {cert};",
            "ssl_certificate_key": f"ssl_certificate_key {key};",
            # /dist/ and the chunk store below it: the documented paths, moved here
            "alias": line.strip().replace("/srv/rampart/webroot/dist", str(dist)),
            "root": f"root {dist.parent};",
            "access_log": f"access_log {state}/access.log;",
            "error_log": f"error_log {state}/error.log;",
        }.get(directive)
        if in_upstream and directive == "server":
            if done.get("server", 0) >= len(app_ports):
                continue  # fewer app servers here than in the example
            replacement = f"server 127.0.0.1:{app_ports[done.get('server', 0)]};"
        if directive == "listen":
            assert "ssl" in line.rstrip(";").split(), f"the documented listen has no ssl: {line}"
        if replacement is not None:
            done[directive] = done.get(directive, 0) + 1
            line = indent + replacement
        out.append(line)
    assert done.get("server") == len(app_ports), "the documented upstream has too few servers"
    for directive in ("listen", "ssl_certificate", "ssl_certificate_key"):
        assert done.get(directive) == 1, f"the documented config has no single {directive}"
    assert done.get("alias") == 2, "the documented config serves dist/ and its chunk store"
    assert done.get("root") == 3, "the documented config serves tuf/ and heads/ from the root"
    return "\n".join(out) + "\n"


# What Debian's /etc/nginx/nginx.conf sets around conf.d/*.conf (the rest of the main
# configuration, with the pid file, logs and temporary paths in the test's directory, is
# rampart.testbed.services.Nginx's).
HTTP = """\
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log {state}/other-access.log;

{site}
"""


# --- the fixture: app, certificates, nginx -----------------------------------------------


@dataclass
class Frontend:
    port: int
    webroot: Path
    vendor: KeyPair
    ca: Path
    token: str
    app_log: Path
    nginx_state: Path

    def connection(self) -> http.client.HTTPSConnection:
        context = ssl.create_default_context(cafile=str(self.ca))
        return http.client.HTTPSConnection("localhost", self.port, timeout=WAIT, context=context)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        return httpkit.request(self.port, method, path, body, headers, ca=self.ca, timeout=WAIT)

    def fleet(self) -> dict[str, object]:
        view: dict[str, object] = json.loads(rampart("fleet", "--webroot", self.webroot, "--json"))
        return view

    def access_log(self) -> str:
        return (self.nginx_state / "access.log").read_text()


def published_webroot(tmp_path: Path, db: str | None = None) -> tuple[Path, KeyPair, str]:
    """A webroot with 1.0.0 then 1.0.1 published (the default channel names 1.0.1) by
    a new vendor key, and an admin token in `db` (default the webroot's SQLite):
    (webroot, vendor key, token)."""
    vendor = make_keypair(tmp_path / "vendor")
    webroot = tmp_path / "webroot"
    for version in ("1.0.0", "1.0.1"):
        core, efiboot = build_payloads(tmp_path, version)
        rampart(
            "publish",
            "--webroot",
            webroot,
            "--os",
            OS,
            "--version",
            version,
            "--core",
            core,
            "--efiboot",
            efiboot,
            "--secret-key",
            vendor.secret,
        )
    database = ["--db", db] if db else []
    created = rampart("token", "create", "ops", "--webroot", webroot, *database, "--json")
    return webroot, vendor, json.loads(created)["token"]


def tuf_options(tmp_path: Path, webroot: Path) -> list[str]:
    """A TUF repository in `webroot`; the options that give `rampart serve` its online key."""
    TufRepo.create(webroot, tmp_path / "tuf-keys")
    password = tmp_path / "tuf-password"
    password.write_bytes(PASSWORD + b"\n")
    password.chmod(0o600)
    return [
        "--tuf-key",
        str(tmp_path / "tuf-keys" / "online-0.key"),
        "--tuf-password-file",
        str(password),
    ]


@contextmanager
def nginx_in_front(
    tmp_path: Path, webroot: Path, app_ports: Sequence[int]
) -> Iterator[tuple[int, Path]]:
    """The documented nginx, proxying to the apps on `app_ports`: (its port, the CA
    that signed its certificate); its state (logs) in tmp_path/nginx."""
    pki = tmp_path / "pki"
    ca = services.make_ca(pki, "rootca")
    server = services.make_cert(pki, "server", ca, ["localhost", "127.0.0.1"])
    state = tmp_path / "nginx"
    port = services.free_port()
    site = adapt(
        documented_config(),
        port=port,
        app_ports=app_ports,
        cert=server.cert,
        key=server.key,
        dist=webroot / "dist",
        state=state,
    )
    http = HTTP.format(state=state, site=site)
    with services.Nginx(state, http, port, root=webroot, check=True, timeout=WAIT):
        yield port, ca.cert


@contextmanager
def start_frontend(tmp_path: Path, *, tuf_keys: bool = False) -> Iterator[Frontend]:
    """A webroot with 1.0.0 then 1.0.1 published (the default channel names 1.0.1), the
    app, nginx in front; with `tuf_keys`, a TUF repository in the webroot and the app
    holding its online key."""
    webroot, vendor, token = published_webroot(tmp_path)
    options = ["-v"]
    if tuf_keys:
        options += tuf_options(tmp_path, webroot)
    app_log = tmp_path / "serve.log"
    with (
        services.RampartServe(webroot, app_log, options=options, timeout=WAIT) as app,
        nginx_in_front(tmp_path, webroot, [app.port]) as (port, ca),
    ):
        yield Frontend(port, webroot, vendor, ca, token, app_log, tmp_path / "nginx")


@pytest.fixture
def frontend(tmp_path: Path) -> Iterator[Frontend]:
    with start_frontend(tmp_path) as running:
        yield running


# --- the test ----------------------------------------------------------------------------


def test_nginx_serves_dist_and_proxies_the_protocol_to_the_app(
    tmp_path: Path, frontend: Frontend
) -> None:
    # TLS: the test CA's certificate for localhost, TLS 1.2 or newer.
    conn = frontend.connection()
    conn.connect()
    assert conn.sock is not None
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    conn.close()
    old = ssl.create_default_context(cafile=str(frontend.ca))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", frontend.port), timeout=WAIT) as raw,
        old.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.2"

    # The version check, through nginx to the app: the exact bytes, and recorded.
    ident = {"clipos-machineid": MID, "clipos-version": "1.0.0"}
    status, headers, body = frontend.request("GET", f"/update/v1/{OS}/version", headers=ident)
    assert (status, body) == (200, b'version = "1.0.1"\n')
    assert headers["content-type"] == "application/octet-stream"
    # Unsigned (the CLIP OS updater): recorded, anonymous. Signed by the machine's key
    # (admitted on first use here): through nginx, it counts.
    rampart("machine", "admission", "first-use", "--webroot", frontend.webroot)
    time.sleep(1.2)  # the setting reaches the app's caches within a second
    signer = file_device(tmp_path / "signer", MID)
    signed = {**ident, **signer.signed("version")}
    status, _, body = frontend.request("GET", f"/update/v1/{OS}/version", headers=signed)
    assert status == 200 and body.startswith(b'version = "1.0.1"\nrampart_nonce = "'), body
    deadline = time.monotonic() + WAIT
    while (view := frontend.fleet())["machines"] != 1:
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    counts = view["counts"]
    assert isinstance(counts, dict)
    assert (counts["checks"], counts["machines"], counts["anonymous_checks"]) == (1, 1, 1)
    replayed = frontend.request("GET", f"/update/v1/{OS}/version", headers=signed)
    assert replayed[0] == 401 and b"replayed request" in replayed[2]
    # The app sees nginx as the client (no X-Forwarded-For is read).
    machine = json.loads(rampart("machine", "show", MID, "--webroot", frontend.webroot, "--json"))
    assert (machine["version"], machine["address"]) == ("1.0.0", "127.0.0.1")

    # Bad input still gets the app's answers through the proxy.
    status, _, body = frontend.request(
        "GET",
        f"/update/v1/{OS}/version",
        headers={"clipos-machineid": "X" * 32, "clipos-version": "1.0.0"},
    )
    assert (status, body) == (400, b"clipos-machineid must be 32 lowercase hex digits\n")
    report = json.dumps({"from": "1.0.0", "to": "1.0.1", "outcome": "failure", "error": "x"})
    status, _, body = frontend.request("POST", f"/update/v1/{OS}/report", report.encode(), ident)
    assert (status, json.loads(body)) == (200, {"recorded": True})
    big = json.dumps({"outcome": "failure", "error": "x" * 20_000}).encode()
    status, _, body = frontend.request("POST", f"/update/v1/{OS}/report", big, ident)
    assert (status, body) == (413, b"report larger than 16384 bytes\n")

    # The admin side is proxied too.
    status, headers, _ = frontend.request("GET", "/admin/")
    assert (status, headers["location"]) == (303, "/admin/login")
    auth = {"Authorization": f"Bearer {frontend.token}"}
    status, _, body = frontend.request("GET", "/admin/api/fleet", headers=auth)
    assert status == 200 and json.loads(body)["machines"] == 1

    # Payloads come from nginx itself: whole files and ranges.
    core = (frontend.webroot / "dist" / "1.0.1" / f"{OS}-core").read_bytes()
    status, headers, body = frontend.request(
        "GET", f"/dist/1.0.1/{OS}-core", headers={"Range": "bytes=1000-1999"}
    )
    assert status == 206
    assert headers["content-range"] == f"bytes 1000-1999/{len(core)}"
    assert body == core[1000:2000]
    status, headers, body = frontend.request(
        "GET", f"/dist/1.0.1/{OS}-core", headers={"Range": f"bytes={len(core) - 10}-"}
    )
    assert (status, body) == (206, core[-10:])
    status, headers, body = frontend.request("GET", f"/dist/1.0.1/{OS}-core.sig")
    assert status == 200 and body.startswith(b"untrusted comment: ")
    assert headers["content-type"] == "application/octet-stream"
    status, _, _ = frontend.request(
        "GET", f"/dist/1.0.1/{OS}-core", headers={"Range": f"bytes={len(core)}-"}
    )
    assert status == 416
    assert frontend.request("GET", "/dist/1.0.1/")[0] in (403, 404)  # no listing
    # The chunk store: static, ranges, cached for good; the index beside Core.
    chunk = next((frontend.webroot / "dist" / "store.castr").glob("*/*.cacnk"))
    path = f"/dist/store.castr/{chunk.parent.name}/{chunk.name}"
    status, headers, body = frontend.request("GET", path, headers={"Range": "bytes=0-9"})
    assert (status, body) == (206, chunk.read_bytes()[:10])
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    status, headers, _ = frontend.request("GET", f"/dist/1.0.1/{OS}-core.caibx")
    assert status == 200 and "cache-control" not in headers
    assert frontend.request("GET", "/dist/store.castr/")[0] in (403, 404)  # no listing

    # The rampart client, running 1.0.0, updates itself through the front end.
    device = make_device(
        tmp_path / "device",
        frontend.vendor,
        frontend.ca,
        f"https://localhost:{frontend.port}",
        running="1.0.0",
    )
    result = run_cli("update", *device.argv())
    assert result.code == 20, result.err
    assert "core_1.0.1" in device.lvs()
    deadline = time.monotonic() + WAIT
    while (view := frontend.fleet())["machines"] != 2:
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    assert view["counts"] == {
        "checks": 2,
        "machines": 2,
        "reports_success": 1,  # the client's, signed
        "anonymous_checks": 1,
        "anonymous_machines": 0,
        "anonymous_reports": 1,  # the failure above, unsigned
    }

    # nginx served every payload request; none reached the app. Core is streamed:
    # range requests only (its tree, its first block, its data).
    access = frontend.access_log()
    for name in (f"{OS}-efiboot.sig", f"{OS}-efiboot", f"{OS}-core.sig"):
        assert re.search(rf'"GET /dist/1\.0\.1/{re.escape(name)} HTTP/1\.1" 200 ', access), name
    assert len(re.findall(rf'"GET /dist/1\.0\.1/{OS}-core HTTP/1\.1" 206 ', access)) >= 3
    assert re.search(r'"GET /update/v1/clipos/version HTTP/1\.1" 200 ', access)
    app_log = frontend.app_log.read_text()
    requests = re.findall(r'"([A-Z]+ \S+) HTTP/1\.1" \d{3}', app_log)
    assert requests, app_log
    assert not [r for r in requests if "/dist" in r], app_log
    # 3 checks (unsigned, signed, the client's), its replay, the bad one
    assert requests.count(f"GET /update/v1/{OS}/version") == 5
    assert requests.count(f"POST /update/v1/{OS}/report") == 3  # 2 reports and the big one


def test_nginx_serves_the_tuf_metadata_and_channel_heads_the_app_signs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `rampart serve --tuf-key` behind the documented nginx: nginx serves tuf/ and
    heads/ itself (the timestamp and the heads with no-cache, only metadata names),
    python-tuf's client reads the signed head through it, and an administrative change
    made through it is signed and served within seconds."""
    with start_frontend(tmp_path, tuf_keys=True) as frontend:
        webroot = frontend.webroot
        head = f"/{tuf.channel_target(OS, 'stable')}"
        deadline = time.monotonic() + WAIT
        while not (webroot / head.lstrip("/")).exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for path, cached in (
            ("/tuf/timestamp.json", False),
            ("/tuf/1.root.json", True),
            ("/tuf/1.targets.json", True),
            (head, False),
        ):
            status, headers, body = frontend.request("GET", path)
            assert (status, body) == (200, (webroot / path.lstrip("/")).read_bytes()), path
            assert headers["content-type"] == "application/json"
            assert ("cache-control" not in headers) == cached, path
            if not cached:
                assert headers["cache-control"] == "no-cache"
        for path in ("/tuf/", "/tuf/.lock", "/tuf/.signer.json", f"/heads/{OS}/", "/heads/"):
            assert frontend.request("GET", path)[0] == 404, path

        monkeypatch.setenv("SSL_CERT_FILE", str(frontend.ca))  # ngclient's urllib3 trusts it
        (tmp_path / "client").mkdir()
        updater = Updater(
            metadata_dir=str(tmp_path / "client"),
            metadata_base_url=f"https://localhost:{frontend.port}/tuf/",
            target_dir=str(tmp_path / "client"),
            target_base_url=f"https://localhost:{frontend.port}/",
            bootstrap=(webroot / "tuf" / "1.root.json").read_bytes(),
            config=UpdaterConfig(prefix_targets_with_hash=False),
        )
        updater.refresh()
        info = updater.get_targetinfo(head.lstrip("/"))
        assert info is not None
        signed = tuf.ChannelHead.from_custom(info.custom, head)
        assert signed == tuf.ChannelHead(OS, "stable", "1.0.1")
        assert Path(updater.download_target(info)).read_bytes() == signed.document()

        auth = {"Authorization": f"Bearer {frontend.token}", "Content-Type": "application/json"}
        body = json.dumps({"os": OS, "name": "beta", "version": "1.0.0"}).encode()
        status, _, answer = frontend.request("POST", "/admin/api/channels", body, auth)
        assert status == 201, answer
        deadline = time.monotonic() + 5
        while frontend.request("GET", f"/{tuf.channel_target(OS, 'beta')}")[0] != 200:
            assert time.monotonic() < deadline, "the new channel was not signed within 5 s"
            time.sleep(0.05)

        # nginx served the metadata itself; the app only saw what nginx does not serve.
        access = frontend.access_log()
        for path in ("/tuf/timestamp.json", "/tuf/1.root.json", head):
            assert re.search(rf'"GET {re.escape(path)} HTTP/1\.1" 200 ', access), path
        app_log = frontend.app_log.read_text()
        served = re.findall(r'"GET (\S+) HTTP/1\.1" 200', app_log)
        assert not [p for p in served if p.startswith(("/tuf/", "/heads/"))], app_log
        del updater
        gc.collect()  # its connections close: the app's graceful stop is not held up
