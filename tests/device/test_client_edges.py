"""Edges of the update client that a review broke: full
download file systems, names too long for LVM, hostile headers and redirects, a
hostile reply from the fetch process, reports, the update-ready marker.

File systems that fill up are real tmpfs mounts of a chosen size (these tests run
as root, as the client does).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from rampart.contracts import signing, wire
from rampart.contracts.version import parse_version
from rampart.device import esp as esp_mod
from rampart.device import fetch, update
from rampart.device.transport import Limits
from rampart.errors import LocalError, RemoteDataError, TransportError
from rampart.testbed.services import Pki
from tests.conftest import KeyPair, run_cli
from tests.device.conftest import OS, make_device, make_release, publish
from tests.device.hostile import Behaviour, endless, hostile_server

OFFERED = "5.0.0-alpha.3"
CORE_PATH = f"/dist/{OFFERED}/{OS}-core"
FETCH_USER = "rampart-fetch"
Posts = list[tuple[str, dict[str, str], bytes]]
LONGEST = 127 - len("core_")  # LVM's limit on LV names, for core_<version>


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path` for the test."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def fill(directory: Path, name: str = "filler") -> None:
    """Write a file into `directory` until its file system is full."""
    block = bytes(1 << 16)
    with (directory / name).open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # tmpfs may still take less than a block: fill that too.
    with (directory / (name + "-tail")).open("wb", buffering=0) as tail:
        try:
            while True:
                tail.write(b"\0")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def reports(posts: Posts) -> list[dict[str, object]]:
    return [json.loads(body) for path, _, body in posts if path.endswith("/report")]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("rampart: error:")]


# --- download file systems, long versions, hostile headers and redirects ------


@pytest.mark.parametrize("fetch_user", ["", FETCH_USER])
def test_unannounced_length_download_fills_the_download_filesystem(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, fetch_user: str
) -> None:
    """No Content-Length and an endless body: the download stops at the free space
    minus the margin (16 MiB of a 40 MiB file system), not at ENOSPC, and the
    partial file is dropped; one line names the file; the failure is reported."""
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    posts: Posts = []
    with hostile_server(
        webroot_dir, pki.server.cert, pki.server.key, {CORE_PATH: endless}, posts
    ) as url:
        device = make_device(
            tmp_path / "device",
            vendor,
            pki.ca.cert,
            url,
            extra_config='max_core_size = "1G"\n',
            fetch_user=fetch_user,
        )
        with tmpfs(device.download, "40m"):
            before = device.state()
            result = run_cli("update", *device.argv())
            assert result.code == 3, result.err
            core = device.download / f"{OS}-{OFFERED}-core"
            [line] = error_lines(result.err)
            assert f"{core}: not enough space to download {OS}-core" in line
            assert "no length announced" in line and "partial file removed" in line
            assert not core.exists()
            disk = os.statvfs(device.download)
            assert disk.f_bavail * disk.f_frsize > 16 << 20  # the margin was kept
            assert device.state() == before
    [report] = reports(posts)
    assert report["outcome"] == "failure" and report["to"] == OFFERED
    assert "not enough space" in str(report["error"])


def core_behind_a_filling_disk(core: bytes, download: Path) -> Behaviour:
    """Announce and send Core; once the client has written 1 MiB of it (so its free
    space check has passed), another writer fills the download file system."""

    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(core)))
        handler.end_headers()
        handler.wfile.write(core[: 3 << 20])
        handler.wfile.flush()
        partial = download / f"{OS}-{OFFERED}-core"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= 1 << 20:
                break
            time.sleep(0.02)
        fill(download)
        try:
            handler.wfile.write(core[3 << 20 :])
        except OSError:
            return

    return send


@pytest.mark.parametrize("fetch_user", ["", FETCH_USER])
def test_enospc_mid_download_names_the_file(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, fetch_user: str
) -> None:
    release = make_release(tmp_path / "rel", OFFERED, core_size=8 << 20)
    publish(webroot_dir, vendor, release)
    device_root = tmp_path / "device"
    download = device_root / "download"
    behaviour = core_behind_a_filling_disk(release.core.read_bytes(), download)
    posts: Posts = []
    with (
        tmpfs(download, "40m"),
        hostile_server(
            webroot_dir, pki.server.cert, pki.server.key, {CORE_PATH: behaviour}, posts
        ) as url,
    ):
        device = make_device(device_root, vendor, pki.ca.cert, url, fetch_user=fetch_user)
        before = device.state()
        result = run_cli("update", *device.argv())
        assert result.code == 3, result.err
        core = download / f"{OS}-{OFFERED}-core"
        [line] = error_lines(result.err)
        assert line == (
            f"rampart: error: {core}: cannot write the download: No space left on device; "
            "partial file removed"
        )
        assert not core.exists()
        assert device.state() == before
    [report] = reports(posts)
    assert "No space left on device" in str(report["error"])


@pytest.mark.parametrize("fetch_user", ["", FETCH_USER])
def test_power_cut_while_writing_core_leaves_no_room_for_a_second_core_copy(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, fetch_user: str
) -> None:
    """Testbed scenario 8 (a power cut while writing Core, then the next update) ended
    in ENOSPC: the verified copy of Core was made beside its download, and the state
    partition could not hold two Cores. The copy now consumes the download from its
    end: a download file system with room for one Core and the download margin is
    enough (24 MiB Core, 16 MiB margin, 44 MiB file system)."""
    release = make_release(tmp_path / "rel", OFFERED, core_size=24 << 20)
    assert 2 * release.core.stat().st_size > 40 << 20  # two copies cannot fit
    publish(webroot_dir, vendor, release)
    with (
        tmpfs(tmp_path / "state", "44m") as state,
        hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}) as url,
    ):
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url, fetch_user=fetch_user)
        config = device.config_dir / "config.toml"
        config.write_text(
            config.read_text().replace(
                'size = "1M"\ncapacity = "8M"', 'size = "32M"\ncapacity = "64M"'
            )
        )
        device = dataclasses.replace(device, download=state / "download")
        result = run_cli("update", *device.argv())
        assert result.code == 20, result.err
        core = (device.vg / f"core_{OFFERED}").read_bytes()
        assert core[: release.core.stat().st_size] == release.core.read_bytes()
        assert sorted(p.name for p in state.rglob("*") if p.is_file()) == []


def publish_unchecked(root: Path, keypair: KeyPair, version: str, tmp_path: Path) -> None:
    """A release as a publisher without the length rule would have written it: a real
    Core and EFI binary built for `version`, whose command line names core_<version>."""
    release = make_release(tmp_path / "long", version)
    parsed = parse_version(version)
    directory = wire.release_dir(root, parsed)
    directory.mkdir(parents=True)
    for kind, path in (("core", release.core), ("efiboot", release.efiboot)):
        shutil.copy(path, directory / f"{OS}-{kind}")
        signature = signing.sign_file(path, keypair.key, version)
        (directory / f"{OS}-{kind}.sig").write_bytes(signature.to_bytes())
    target = wire.version_file(root, OS)
    target.parent.mkdir(parents=True)
    target.write_bytes(wire.render_version_document(parsed))


def test_version_too_long_for_an_lv_name_keeps_the_fallback_entry(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    """A 123-character version: core_<V> is 128 characters, one more than LVM allows.
    The client refuses it before it removes anything (the fallback entry and LV stay)."""
    version = "9.0.0-" + "a" * (LONGEST + 1 - len("9.0.0-"))
    publish_unchecked(webroot_dir, vendor, version, tmp_path)
    posts: Posts = []
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}, posts) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        (device.vg / "core_5.0.0-alpha.0").write_bytes(bytes(1 << 20))
        (device.esp / f"{OS}-5.0.0-alpha.0.efi").write_bytes(b"fallback efi")
        before = device.state()
        for _ in range(2):  # every run, not only the first
            result = run_cli("update", *device.argv())
            assert device.state() == before, f"the device changed: {result.err}"
            assert result.code == 10, result.err
            [line] = error_lines(result.err)
            assert "123 characters" in line and "LVM" in line
    assert not any("/dist/" in path for path, _, _ in posts)
    assert [r["outcome"] for r in reports(posts)] == ["failure", "failure"]


def test_longest_release_version_installs(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    """The limit is exact: a 122-character version publishes and installs."""
    version = "9.0.0-" + "a" * (LONGEST - len("9.0.0-"))
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", version))
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        dev = device.open()
        result = update.update(dev, update.make_fetcher(dev))
        assert result.outcome == update.Outcome.UPDATED
        assert result.slot == f"core_{version}" and len(result.slot) == 127


def content_length(value: str) -> Behaviour:
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", value)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(b"x" * 10)

    return send


@pytest.mark.parametrize("value", ["\u00b2", "\u00b9\u00b2\u00b3", "1" * 20, " +5", "1_0", "0x10"])
def test_content_length_that_is_not_ascii_digits(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, value: str
) -> None:
    """`²`.isdigit() is true and int() refuses it: it crashed the client (exit 1, no
    report). Now any Content-Length but 1 to 19 ASCII digits is exit 10, reported."""
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    posts: Posts = []
    behaviours = {CORE_PATH: content_length(value)}
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, behaviours, posts) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        before = device.state()
        result = run_cli("update", *device.argv())
        assert result.code == 10, result.err
        [line] = error_lines(result.err)
        assert f"{OS}-core: invalid Content-Length" in line
        assert device.state() == before
    [report] = reports(posts)
    assert "invalid Content-Length" in str(report["error"])


def redirect(location: str) -> Behaviour:
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return send


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("https://a..b/x", "invalid host name"),  # an empty label: IDNA refuses it
        (f"https://{'a' * 64}.example/x", "invalid host name"),  # a label over 63
        ("https://\u00e9" + "x" * 70 + ".example/x", "invalid host name"),
        ("https://[::1/x", "invalid URL"),  # urlsplit raises ValueError
        ("https://localhost:99999/x", "invalid URL or port"),
    ],
)
def test_redirect_to_an_invalid_host(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, location: str, why: str
) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    posts: Posts = []
    behaviours = {CORE_PATH: redirect(location)}
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, behaviours, posts) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        before = device.state()
        result = run_cli("update", *device.argv())
        assert result.code == 12, result.err
        [line] = error_lines(result.err)
        assert "refusing a redirect to" in line and why in line
        assert device.state() == before
    [report] = reports(posts)
    assert "refusing a redirect" in str(report["error"])


# --- a hostile reply from the fetch process -----------------------------------------------

CREDENTIALS = {
    "pid": 1,
    "uid": 999,
    "euid": 999,
    "gid": 999,
    "egid": 999,
    "groups": [],
    "cap_eff": "0000000000000000",
    "cap_prm": "0000000000000000",
    "cap_bnd": "0000000000000000",
    "no_new_privs": "1",
}


def fetcher(tmp_path: Path, pki: Pki) -> fetch.Fetcher:
    limits = Limits()
    return fetch.Fetcher(pki.ca.cert, {}, limits, FETCH_USER, tmp_path / "download")


@pytest.mark.parametrize(
    "reply",
    [
        b'{"ok": false, "error": "boom"}',  # AttributeError: 'str' has no .get
        b'{"ok": false, "error": ["x"]}',
        b'{"ok": false, "error": {"kind": ["LocalError"], "message": "x"}}',
        b'{"ok": false, "error": {"kind": "LocalError", "message": {"a": 1}}}',
        b'{"ok": true, "results": [1], "credentials": "root"}',
        b'{"ok": true, "results": [1], "credentials": {"uid": "0"}}',
        b'{"ok": true, "results": "1", "credentials": {}}',
        b'{"ok": 1, "results": [1]}',
        b"[" * 200_000 + b"]" * 200_000,  # RecursionError in json
        b'{"ok": true, "results": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"ok": true, "results": [1e999], "credentials": {}}',  # inf
        b'{"ok": true, "results": [' + b"9" * 4000 + b'], "credentials": {}}',
        b'{"ok": true, "results": [true], "credentials": {}}',
        b'{"ok": true, "results": [-1], "credentials": {}}',
        b"\xff\xfe",
        b"",
    ],
)
def test_hostile_reply_from_the_fetch_process(tmp_path: Path, pki: Pki, reply: bytes) -> None:
    """The child runs network code and is not trusted: whatever it sends, root's
    parser raises one LocalError (exit 3), never AttributeError or RecursionError."""
    with pytest.raises(LocalError, match="fetch process sent a malformed reply"):
        fetcher(tmp_path, pki)._parse_reply(reply, 1)


def test_hostile_results_from_the_fetch_process_break_the_schema_of_their_jobs() -> None:
    version = fetch.Job("version", "https://u/v", 4096)
    download = fetch.Job("download", "https://u/d", 1000, "/d")
    report = fetch.Job("report", "https://u/r", 1 << 16)
    assert fetch.check_results([version, download, report], ["1.0.0", 1000, 204])
    assert fetch.check_results([version], ["1.0.0 1796526729.4c0e"])  # and a nonce
    for job, result in [
        (version, 5),
        (version, "1" * 129),
        (version, "1" * 129 + " 17.ab"),
        (version, "1.0.0 NOT A NONCE"),
        (download, 1001),
        (download, "1000"),
        (report, 99),
        (report, 10**30),
    ]:
        with pytest.raises(LocalError, match="malformed reply"):
            fetch.check_results([job], [result])


def test_valid_reply_from_the_fetch_process_is_accepted(tmp_path: Path, pki: Pki) -> None:
    ok = {"ok": True, "results": ["1.0.0"], "credentials": CREDENTIALS}
    got = fetcher(tmp_path, pki)
    assert got._parse_reply(json.dumps(ok).encode(), 1) == ["1.0.0"]
    assert got.last_credentials == CREDENTIALS
    error = {"ok": False, "error": {"kind": "TransportError", "message": "down\x1b[2J"}}
    with pytest.raises(TransportError, match=r"^down\?\[2J$"):
        got._parse_reply(json.dumps(error).encode(), 1)
    error["error"] = {"kind": "SystemExit", "message": "x"}  # not a class it may choose
    with pytest.raises(RemoteDataError):
        got._parse_reply(json.dumps(error).encode(), 1)


# --- reports, the update-ready marker, ENOSPC, the ESP margin, hashing -------


def test_uncreatable_run_dir_reports_the_failure(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    posts: Posts = []
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}, posts) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        device.run_dir.write_text("a file where the run directory should be\n")
        result = run_cli("update", *device.argv())
        assert result.code == 3, result.err
        [line] = error_lines(result.err)
        assert f"{device.run_dir}: cannot use the run directory" in line
    [report] = reports(posts)
    assert report["outcome"] == "failure" and report["to"] is None
    assert "cannot use the run directory" in str(report["error"])


def test_run_refused_by_the_lock_sends_no_report(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    """A report is a fetch, which would hand the download directory over while the
    run holding the lock uses it: a refused run reports nothing (docs now agree)."""
    import fcntl

    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    posts: Posts = []
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}, posts) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        device.run_dir.mkdir()
        fd = os.open(device.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            result = run_cli("update", *device.argv())
            assert result.code == 4, result.err
        finally:
            os.close(fd)
    assert posts == []


def test_failed_update_ready_write_leaves_no_empty_marker(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    webroot_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run directory's file system is full when the marker is written: the update
    is installed (exit 20, success reported), the failure is logged naming the
    marker, and no empty or partial marker is left to claim a pending update."""
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    posts: Posts = []
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}, posts) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        with tmpfs(device.run_dir, "64k"):
            fill(device.run_dir)
            with caplog.at_level(logging.INFO):
                result = run_cli("update", *device.argv())
            assert result.code == 20, result.err
            assert sorted(p.name for p in device.run_dir.iterdir()) == ["filler", "filler-tail"]
            marker = device.run_dir / "update-ready"
            assert (
                f"update installed, but {marker}: cannot write the update-ready marker "
                "(No space left on device)" in caplog.text
            )
    assert (device.esp / f"{OS}-{OFFERED}.efi").exists()
    assert [r["outcome"] for r in reports(posts)] == ["success"]


def test_esp_space_message_names_its_margin(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "esp", "4m") as directory:
        free = esp_mod.Esp(directory, OS).free_space()
        efi = tmp_path / "efi"
        efi.write_bytes(bytes(free - (esp_mod.ESP_MARGIN // 2)))  # fits, but not with 1 MiB
        with pytest.raises(LocalError) as caught:
            esp_mod.Esp(directory, OS).install(efi, parse_version(OFFERED), 0)
        assert str(caught.value) == (
            f"{directory}: not enough space on the ESP for {OS}-{OFFERED}.efi "
            f"({free - esp_mod.ESP_MARGIN // 2} bytes needed plus {esp_mod.ESP_MARGIN} kept "
            f"free, {free} free)"
        )
        assert list(directory.iterdir()) == []


def test_resumed_run_hashes_the_cached_core_once(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    webroot_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that finds a verified Core in the download directory verifies it once
    (signature check, which hashes it) before writing it, not twice."""
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))

    class Interrupted(Exception):
        pass

    def stop_after_download(step: str) -> None:
        if step == "remove-entries":
            raise Interrupted

    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        dev = device.open()
        with pytest.raises(Interrupted):
            update.update(dev, update.make_fetcher(dev), stop_after_download)
        hashed: list[str] = []  # each pass that hashes a payload: a check or a copy's
        verify_file = signing.verify_file
        verify_fd = update._verify_fd

        def counting(path: Path, *args: object, **kwargs: object) -> bytes:
            hashed.append(Path(path).name)
            return verify_file(path, *args, **kwargs)  # type: ignore[arg-type]

        def counting_fd(dev: update.Device, fd: int, path: Path, evidence: Any) -> bytes:
            hashed.append(path.name)
            return verify_fd(dev, fd, path, evidence)

        monkeypatch.setattr(signing, "verify_file", counting)
        monkeypatch.setattr(update, "_verify_fd", counting_fd)
        dev = device.open()
        assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED
    assert hashed.count(f"{OS}-{OFFERED}-core") == 1


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://[::1/update/v1", "not a valid URL"),  # urlsplit raised ValueError
        ("https://a..b/update/v1", "invalid host name"),
        ("https://localhost:99999/update/v1", "invalid port"),
    ],
)
def test_remote_url_that_cannot_be_connected_to_is_refused_when_read(
    tmp_path: Path, vendor: KeyPair, pki: Pki, url: str, why: str
) -> None:
    device = make_device(tmp_path / "device", vendor, pki.ca.cert, "https://localhost:1")
    remote = device.remote_dir / "remote.toml"
    remote.write_text(f'update_url = "{url}"\ndist_url = "https://localhost:1/dist"\n')
    result = run_cli("update", *device.argv())
    assert result.code == 10, result.err
    [line] = error_lines(result.err)
    assert f"{remote}: update_url" in line and why in line
