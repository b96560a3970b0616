"""Unprivileged network processing: the fetch process really runs without privileges.

These tests need root (to switch to the fetch user), as the client does; CI runs as root.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import time
from pathlib import Path
from typing import Any

import pytest

from rampart.device import fetch, update
from rampart.errors import LocalError
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import make_device, make_release, publish

FETCH_USER = "rampart-fetch"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def fetch_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(FETCH_USER)
    except KeyError:
        pytest.fail(f"user {FETCH_USER} missing: run `make setup`")


@needs_root
def test_fetch_process_runs_without_privileges(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, fetch_account: pwd.struct_passwd
) -> None:
    publish(served.root, vendor, make_release(tmp_path / "rel", "5.0.0-alpha.3"))
    device = make_device(
        tmp_path / "device", vendor, pki.ca.cert, served.url, fetch_user=FETCH_USER
    )
    dev = device.open()
    fetcher = update.make_fetcher(dev)
    assert fetcher.user == FETCH_USER
    result = update.update(dev, fetcher)
    assert result.outcome == update.Outcome.UPDATED
    creds = fetcher.last_credentials
    assert creds["uid"] == creds["euid"] == fetch_account.pw_uid
    assert creds["gid"] == creds["egid"] == fetch_account.pw_gid
    assert creds["groups"] == []
    assert int(creds["cap_eff"], 16) == 0
    assert int(creds["cap_prm"], 16) == 0
    assert int(creds["cap_bnd"], 16) == 0
    assert creds["no_new_privs"] == "1"
    assert creds["pid"] == 1  # the first process of its own PID namespace
    # After the fetch, root owns the download directory and files again.
    assert device.download.stat().st_uid == 0
    for entry in device.download.iterdir():
        assert entry.stat().st_uid == 0
        assert entry.stat().st_mode & 0o777 == 0o600


@needs_root
def test_dropped_process_cannot_write_outside_the_download_dir(
    tmp_path: Path, fetch_account: pwd.struct_passwd
) -> None:
    outside = Path("/etc") / "rampart-privsep-probe"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        results = {}
        try:
            fetch.drop_privileges(fetch_account.pw_uid, fetch_account.pw_gid)
            for name, action in (
                ("write_etc", lambda: outside.write_text("x")),
                ("setuid_root", lambda: os.setuid(0)),
                ("read_shadow", lambda: Path("/etc/shadow").read_bytes()),
            ):
                try:
                    action()
                    results[name] = "allowed"
                except PermissionError:
                    results[name] = "denied"
        finally:
            os.write(write_end, json.dumps(results).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        results = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert results == {"write_etc": "denied", "setuid_root": "denied", "read_shadow": "denied"}
    assert not outside.exists()


@needs_root
def test_leftover_daemon_of_the_fetch_process_is_killed(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    fetch_account: pwd.struct_passwd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon the fetch process started (a new session, its parent gone) ends with
    the fetch: it lived in the fetch process's PID namespace."""
    publish(served.root, vendor, make_release(tmp_path / "rel", "5.0.0-alpha.3"))
    device = make_device(
        tmp_path / "device", vendor, pki.ca.cert, served.url, fetch_user=FETCH_USER
    )
    alive_r, alive_w = os.pipe()
    execute = fetch.execute

    def start_a_daemon_then_execute(*args: Any) -> list[Any]:  # in the fetch process
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.closerange(3, alive_w)
                os.closerange(alive_w + 1, 65536)
                time.sleep(120)
            os._exit(0)
        return execute(*args)

    monkeypatch.setattr(fetch, "execute", start_a_daemon_then_execute)
    dev = device.open()
    url = f"{served.url}/update/v1/clipos/version"
    try:
        assert update.make_fetcher(dev).run([fetch.Job("version", url, 4096)]) == ["5.0.0-alpha.3"]
        os.close(alive_w)
        alive_w = -1
        os.set_blocking(alive_r, False)
        try:
            gone = os.read(alive_r, 1) == b""  # every holder of the write end is gone
        except BlockingIOError:
            gone = False
        assert gone, "the daemon started by the fetch process still runs"
    finally:
        os.close(alive_r)
        if alive_w >= 0:
            os.close(alive_w)


@needs_root
def test_symlink_planted_in_the_download_dir_is_removed(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, fetch_account: pwd.struct_passwd
) -> None:
    publish(served.root, vendor, make_release(tmp_path / "rel", "5.0.0-alpha.3"))
    device = make_device(
        tmp_path / "device", vendor, pki.ca.cert, served.url, fetch_user=FETCH_USER
    )
    device.download.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    (device.download / "clipos-5.0.0-alpha.3-core").symlink_to(victim)
    dev = device.open()
    update.update(dev, update.make_fetcher(dev))
    assert victim.read_text() == "root's file"
    assert not (device.download / "clipos-5.0.0-alpha.3-core").is_symlink()


_CAP_SYS_ADMIN = 21


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_effective_cap(cap: int) -> None:
    """Remove `cap` from this process's effective capability set (capset(2), v3)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[cap // 32].effective &= ~(1 << (cap % 32))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@needs_root
def test_fetch_without_a_pid_namespace_is_refused_and_the_directory_taken_back(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, fetch_account: pwd.struct_passwd
) -> None:
    """Without CAP_SYS_ADMIN (or under a unit whose RestrictNamespaces= forbids pid)
    no fetch runs unconfined: one clear error, and the directory is root's again."""
    publish(served.root, vendor, make_release(tmp_path / "rel", "5.0.0-alpha.3"))
    device = make_device(
        tmp_path / "device", vendor, pki.ca.cert, served.url, fetch_user=FETCH_USER
    )
    url = f"{served.url}/update/v1/clipos/version"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "no error"
        try:
            _drop_effective_cap(_CAP_SYS_ADMIN)
            dev = device.open()
            update.make_fetcher(dev).run([fetch.Job("version", url, 4096)])
        except LocalError as exc:
            outcome = str(exc)
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    assert outcome.startswith("cannot create a PID namespace for the fetch process: "), outcome
    assert "RestrictNamespaces" in outcome
    assert device.download.stat().st_uid == 0


# --- the stream pipe: root checks what the untrusted fetch process says of each range ---


class _Kept:
    """A receiver keeping what it gets."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.space = bytearray(4096)
        self.begun: tuple[int, int, int] | None = None

    def begin(self, offset: int, length: int, total: int) -> None:
        self.begun = (offset, length, total)

    def buffer(self) -> memoryview:
        return memoryview(self.space)

    def filled(self, count: int) -> None:
        self.data += self.space[:count]


def pumped(job: fetch.Job, sent: bytes) -> tuple[list[int], _Kept]:
    read_end, write_end = os.pipe()
    os.write(write_end, sent)
    os.close(write_end)
    kept = _Kept()
    try:
        return fetch._pump(read_end, [job], [kept]), kept
    finally:
        os.close(read_end)


STREAM_JOB = fetch.Job("stream", "https://example/core", 10_000, start=100, end=200)


def test_stream_range_as_asked_reaches_the_receiver() -> None:
    done, kept = pumped(STREAM_JOB, fetch.STREAM_HEADER.pack(100, 100, 5000) + bytes(range(100)))
    assert done == [100] and kept.begun == (100, 100, 5000) and kept.data == bytes(range(100))


@pytest.mark.parametrize(
    ("offset", "length", "total"),
    [(0, 100, 5000), (100, 101, 5000), (100, 100, 150), (100, 100, 10_001)],
    ids=["elsewhere", "longer", "beyond-its-size", "beyond-the-cap"],
)
def test_fetch_process_announcing_another_range_is_refused(
    offset: int, length: int, total: int
) -> None:
    with pytest.raises(LocalError, match="malformed stream"):
        pumped(STREAM_JOB, fetch.STREAM_HEADER.pack(offset, length, total) + bytes(length))


def test_fetch_process_ending_a_range_early_is_not_counted_whole() -> None:
    done, kept = pumped(STREAM_JOB, fetch.STREAM_HEADER.pack(100, 100, 5000) + bytes(60))
    assert done == [] and len(kept.data) == 60
