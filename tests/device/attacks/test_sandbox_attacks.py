"""Attacks on the fetch sandbox and on what root reads from the download directory.

An attacker who runs code in the fetch process (as the fetch user, without
capabilities) tries to keep a process alive after the take-back, to change an
EFI binary after root verified it, and to make root's removal of the download
directory's junk delete files elsewhere. These tests need root, as the client
does (make setup creates the fetch user); CI runs as root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rampart.contracts.version import Version, parse_version
from rampart.device import update
from rampart.device.esp import Esp
from rampart.device.fetch import Job
from rampart.errors import LocalError
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import OS, DeviceDirs, make_device, make_release, publish

FETCH_USER = "rampart-fetch"
OFFERED = "5.0.0-alpha.3"
SETUP_TIMEOUT = 60.0  # generous: the machine may be busy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_EXIT = {"x86_64": 60, "aarch64": 93}  # exit(2): ends the calling thread only
_RENAME_EXCHANGE = 2


@pytest.fixture
def fetch_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(FETCH_USER)
    except KeyError:
        pytest.fail(f"user {FETCH_USER} missing: run `make setup`")


@pytest.fixture
def device(tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx) -> DeviceDirs:
    publish(served.root, vendor, make_release(tmp_path / "rel", OFFERED))
    return make_device(tmp_path / "device", vendor, pki.ca.cert, served.url, fetch_user=FETCH_USER)


def _become(account: pwd.struct_passwd) -> None:
    os.setgroups([])
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)


def _process_state() -> str:
    """The state letter of this process (its thread group leader's)."""
    stat = Path("/proc/self/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _fork_zombie_leader(ready_w: int, alive_w: int, release_r: int) -> None:
    """Fork a process whose main thread exits while a second thread lives on: its
    leader is a zombie (`Z`, `Zl` in ps) and the process keeps running. The thread
    writes b"Z" on `ready_w` once the leader is a zombie, then holds `alive_w` open
    until the test closes the write end of `release_r`. It closes every other
    descriptor, so the fetch itself can end."""
    if os.fork() != 0:
        return
    keep = sorted({ready_w, alive_w, release_r})
    for low, high in zip([2, *keep], [*keep, 65536], strict=True):
        os.closerange(low + 1, high)  # the fetch's reply pipe too: the fetch can end

    def live_on() -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT
        while _process_state() != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(ready_w, b"Z")
        os.read(release_r, 1)  # until the test releases it
        os._exit(0)

    threading.Thread(target=live_on).start()
    _LIBC.syscall(_SYS_EXIT[os.uname().machine], 0)
    os._exit(1)  # not reached


def _wait_readable(fd: int, what: str) -> bytes:
    readable, _, _ = select.select([fd], [], [], SETUP_TIMEOUT)
    assert readable, f"test setup: {what} within {SETUP_TIMEOUT} s"
    return os.read(fd, 1)


def test_zombie_leader_with_a_live_thread_outlives_the_take_back(
    device: DeviceDirs, served: Nginx, fetch_account: pwd.struct_passwd
) -> None:
    """The fetch process leaves behind a process whose leader has exited while one
    of its threads still runs (as the fetch user). When the fetcher returns, that
    thread must be gone: the pipe end it held is closed, at once."""
    ready_r, ready_w = os.pipe()
    alive_r, alive_w = os.pipe()
    release_r, release_w = os.pipe()
    spawned = {"done": False}

    def in_the_fetch_process(done: int, total: int | None) -> None:
        if spawned["done"]:
            return
        spawned["done"] = True
        _fork_zombie_leader(ready_w, alive_w, release_r)
        # Go on only once the leftover's leader is a zombie and its thread runs.
        assert _wait_readable(ready_r, "the leftover's leader became a zombie") == b"Z"

    dev = device.open()
    fetcher = update.make_fetcher(dev)
    assert fetcher.user == FETCH_USER
    fetcher.progress = in_the_fetch_process
    url = f"{served.url}/dist/{OFFERED}/{OS}-core"
    dest = update.payload_path(dev, parse_version(OFFERED), "core")
    try:
        fetcher.run([Job("download", url, 1 << 20, str(dest))])
        os.close(alive_w)
        alive_w = -1
        os.set_blocking(alive_r, False)
        try:
            leftover_gone = os.read(alive_r, 1) == b""
        except BlockingIOError:
            leftover_gone = False
        assert leftover_gone, "a thread of the fetch user's leftover process still runs"
        assert dest.stat().st_uid == 0
    finally:
        for fd in (ready_r, ready_w, release_r, release_w, alive_r, alive_w):
            if fd >= 0:
                os.close(fd)  # release_w: lets a surviving leftover end


def test_efiboot_rewritten_after_root_verified_it_is_not_installed(
    device: DeviceDirs, fetch_account: pwd.struct_passwd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that kept a descriptor of the downloaded EFI binary (a process that
    outlived the fetch, as in the test above) replaces its bytes after root verified
    them, just before the boot entry is installed: the entry must hold the signed
    bytes, never the writer's. The writer is this (root) test process, so the
    attack does not depend on a process surviving the sandbox."""
    dev = device.open()
    fetcher = update.make_fetcher(dev)
    downloaded = update.payload_path(dev, parse_version(OFFERED), "efiboot")
    writer: list[int] = []
    fetch_run = fetcher.run

    def run_and_keep_a_descriptor(jobs: list[Job]) -> list[object]:
        results = fetch_run(jobs)
        if not writer and downloaded.exists():
            writer.append(os.open(downloaded, os.O_WRONLY | os.O_CLOEXEC))
        return results

    install = Esp.install
    unsigned = b"MZ unsigned EFI binary from the attacker"

    def rewrite_then_install(esp: Esp, source: Path, version: Version, tries: int) -> Path:
        os.pwrite(writer[0], unsigned, 0)
        os.ftruncate(writer[0], len(unsigned))
        return install(esp, source, version, tries)

    monkeypatch.setattr(fetcher, "run", run_and_keep_a_descriptor)
    monkeypatch.setattr(Esp, "install", rewrite_then_install)
    signed = (device.root.parent / "rel" / f"efiboot-{OFFERED}").read_bytes()
    try:
        result = update.update(dev, fetcher)
    finally:
        for fd in writer:
            os.close(fd)
    assert writer, "test setup: the EFI binary was never downloaded"
    assert result.outcome == update.Outcome.UPDATED
    assert (device.esp / f"{OS}-{OFFERED}.efi").read_bytes() == signed


PAIRS = 4
FILES = 500


def _exchanger(junk_fd: int, ready_w: int, account: pwd.struct_passwd) -> Callable[[], None]:
    def exchange_until_one_is_gone() -> None:
        _become(account)
        live = set(range(PAIRS))
        deadline = time.monotonic() + SETUP_TIMEOUT
        first = True
        while live and time.monotonic() < deadline:
            for i in list(live):
                a, b = f"d{i}".encode(), f"l{i}".encode()
                if _LIBC.renameat2(junk_fd, a, junk_fd, b, _RENAME_EXCHANGE) != 0:
                    if ctypes.get_errno() == errno.ENOENT:
                        live.discard(i)  # root removed one of the two
                    else:
                        os._exit(2)
            if first:
                os.write(ready_w, b"1")
                first = False
        os._exit(0)

    return exchange_until_one_is_gone


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "outside"
    directory.mkdir()
    for i in range(PAIRS):
        for j in range(FILES):
            (directory / f"p{i}-f{j}").write_text("root's file")
    yield directory


def test_symlink_exchanged_with_a_directory_during_removal_deletes_nothing_outside(
    device: DeviceDirs, served: Nginx, outside: Path, fetch_account: pwd.struct_passwd
) -> None:
    """The fetch user left directories `junk/d<i>` and symbolic links `junk/l<i>` to a
    directory outside, holding files of the same names, and swaps each pair
    (renameat2 RENAME_EXCHANGE) in a loop while root removes `junk` at the next
    hand-over. Root may fail, but must not delete a file outside."""
    before = sorted(p.name for p in outside.iterdir())
    device.download.mkdir(mode=0o700)
    junk = device.download / "junk"
    junk.mkdir()
    for i in range(PAIRS):
        (junk / f"d{i}").mkdir()
        for j in range(FILES):
            (junk / f"d{i}" / f"p{i}-f{j}").write_text("junk")
        (junk / f"l{i}").symlink_to(outside)
    for path in [junk, *junk.rglob("*")]:
        os.chown(path, fetch_account.pw_uid, fetch_account.pw_gid, follow_symlinks=False)
    junk_fd = os.open(junk, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _exchanger(junk_fd, ready_w, fetch_account)()
        finally:
            os._exit(3)
    os.close(junk_fd)
    os.close(ready_w)
    try:
        assert _wait_readable(ready_r, "the exchanger started") == b"1"
        dev = device.open()
        fetcher = update.make_fetcher(dev)
        url = f"{served.url}/update/v1/{OS}/version"
        # The hand-over removes `junk` while the pairs are being swapped: the
        # attacker may make the removal fail, not escape.
        with contextlib.suppress(LocalError, OSError):
            assert fetcher.run([Job("version", url, 4096)]) == [OFFERED]
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    left = sorted(p.name for p in outside.iterdir())
    assert left == before, f"{len(before) - len(left)} files deleted outside the download directory"
