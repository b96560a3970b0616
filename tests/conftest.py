"""Shared fixtures: keys, a CLI runner, and the real minisign binary."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart import cli, signing


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
    signing.write_new_file(secret, signing.secret_key_to_bytes(key, None), 0o600)
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
    """Two dummy releases: version -> (core, efiboot)."""
    result = {}
    for version in ("1.0.0", "1.0.1", "1.0.2"):
        core = tmp_path / "payloads" / f"core-{version}"
        efiboot = tmp_path / "payloads" / f"efiboot-{version}"
        core.parent.mkdir(parents=True, exist_ok=True)
        core.write_bytes(os.urandom(100_000) + version.encode())
        efiboot.write_bytes(os.urandom(10_000) + version.encode())
        result[version] = (core, efiboot)
    return result


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
