"""Shared fixtures: keys, a CLI runner, the real minisign binary, the test PKI, a real
swtpm, and a minimal UKI for the code that reads only its command line."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart import cli, files
from rampart.contracts import exposure, signing
from rampart.device import tpm
from rampart.testbed import services


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
    """Run `rampart ARGV` in-process; return exit code and captured output."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    if env:
        os.environ.update(env)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in argv])
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Result(code, out.getvalue(), err.getvalue())


@dataclass(frozen=True)
class KeyPair:
    secret: Path
    public: Path
    key: signing.SecretKey


def make_keypair(directory: Path, name: str = "vendor") -> KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    key = signing.generate_secret_key()
    secret = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    files.write_new_file(secret, signing.secret_key_to_bytes(key, None), 0o600)
    public.write_bytes(key.public_key.to_bytes())
    return KeyPair(secret, public, key)


@pytest.fixture
def keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys")


@pytest.fixture
def other_keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "other-keys", "other")


@pytest.fixture
def payloads(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Three real releases of clipos (tests/releases.py): version -> (core, efiboot)."""
    from tests.releases import build_payloads

    return {
        version: build_payloads(tmp_path / "payloads", version)
        for version in ("1.0.0", "1.0.1", "1.0.2")
    }


def tree_snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for directories)."""
    if not root.exists():
        return {}
    snap: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        snap[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return snap


MINISIGN = shutil.which("minisign")


@pytest.fixture
def minisign() -> str:
    """The real minisign binary (installed by `make setup`; its absence is a failure)."""
    assert MINISIGN is not None, "minisign is not installed: run `make setup`"
    return MINISIGN


def run_tool(
    argv: Sequence[str | os.PathLike[str]], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, check=False)


# --- real services (rampart.testbed.services) -------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> services.Pki:
    """The test PKI: a CA and its server certificate for localhost and 127.0.0.1, one
    for another host name, and another CA with its own localhost certificate."""
    return services.make_pki(tmp_path_factory.mktemp("pki"))


def start_swtpm(state: Path) -> Iterator[tpm.Tpm]:
    """A real swtpm (TPM 2.0 simulator) on a loopback port, state in `state`; yields the
    Tpm reaching it (TCTI `swtpm:host=127.0.0.1,port=P`), stopped on exit."""
    with services.Swtpm(state) as swtpm:
        yield swtpm.tpm


def tcti_of(chip: tpm.Tpm) -> str:
    """The TCTI string of a Tpm, for a [tpm] tcti in a device's config.toml."""
    return chip.env["TPM2TOOLS_TCTI"]


# --- a minimal UKI -------------------------------------------------------------------------


def assert_offline_exposure_within_goal(unit: str, path: Path) -> None:
    """systemd-analyze's offline score of `unit` is within its goal in exposure.toml.
    `path` is the unit file, or a root directory holding it (and its drop-ins) under
    lib/systemd/system or etc/systemd/system."""
    where = [f"--root={path}", unit] if path.is_dir() else [str(path)]
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", *where],
        capture_output=True,
        text=True,
        check=False,
    )
    scores = exposure.parse_scores(done.stdout + done.stderr)
    goal = {g.unit: g.goal for g in exposure.load()}[unit]
    assert scores[unit] <= goal, done.stdout


def fake_uki(cmdline: str) -> bytes:
    """A minimal PE file with a `.cmdline` section (what the client reads of a UKI)."""
    body = cmdline.encode() + b"\0"
    header = bytearray(0x40)
    header[:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, 0x40)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 0, 0x22)
    table_end = 0x40 + len(coff) + 40
    section = struct.pack(
        "<8sIIIIIIHHI", b".cmdline", len(body), 0x1000, len(body), table_end, 0, 0, 0, 0, 0x40000040
    )
    return bytes(header) + coff + section + body


# Each version's (Core, EFI binary) files.
Payloads = dict[str, tuple[Path, Path]]


def publish_args(
    root: Path, keypair: KeyPair, payloads: Payloads, version: str
) -> list[str | os.PathLike[str]]:
    """The argv of `rampart publish` for `version` of `payloads` into `root`."""
    core, efiboot = payloads[version]
    return [
        "publish",
        "--webroot",
        root,
        "--os",
        "clipos",
        "--version",
        version,
        "--core",
        core,
        "--efiboot",
        efiboot,
        "--secret-key",
        keypair.secret,
    ]
