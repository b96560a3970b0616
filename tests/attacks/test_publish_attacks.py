"""Mix-ups `rampart publish` must refuse: the signature binds only
the version, so a release with the wrong payloads would be signed and served. Each
test runs the CLI, asserts one line on stderr, the documented exit code, and that
the webroot was not touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rampart.release import uki
from tests.conftest import KeyPair, Payloads, publish_args, run_cli, tree_snapshot
from tests.releases import build_payloads, build_uki


def refused(
    root: Path, keypair: KeyPair, version: str, core: Path, efiboot: Path, code: int, text: str
) -> None:
    before = tree_snapshot(root)
    result = run_cli(*publish_args(root, keypair, {version: (core, efiboot)}, version))
    assert result.code == code, result.err
    assert result.err.count("\n") == 1, result.err
    assert text in result.err
    assert tree_snapshot(root) == before


@pytest.fixture
def root(tmp_path: Path, keypair: KeyPair, payloads: Payloads) -> Path:
    """A webroot whose default channel names 1.0.0."""
    webroot = tmp_path / "webroot"
    core, efiboot = payloads["1.0.0"]
    argv: list[str | Path] = [
        "publish",
        "--webroot",
        webroot,
        "--os",
        "clipos",
        "--version",
        "1.0.0",
    ]
    result = run_cli(*argv, "--core", core, "--efiboot", efiboot, "--secret-key", keypair.secret)
    assert result.code == 0, result.err
    return webroot


def test_publish_refuses_swapped_payloads(root: Path, keypair: KeyPair, payloads: Payloads) -> None:
    core, efiboot = payloads["1.0.1"]
    refused(root, keypair, "1.0.1", efiboot, core, 10, "refusing it as the EFI binary")


def test_publish_refuses_core_given_as_efiboot(
    root: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    core, _ = payloads["1.0.1"]
    refused(root, keypair, "1.0.1", core, core, 10, "not a PE file")


def test_publish_refuses_efiboot_given_as_core(
    root: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    _, efiboot = payloads["1.0.1"]
    refused(root, keypair, "1.0.1", efiboot, efiboot, 10, "not a squashfs image")


def test_publish_refuses_random_bytes_as_payloads(
    root: Path, keypair: KeyPair, tmp_path: Path
) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(50_000))
    refused(root, keypair, "1.0.1", junk, junk, 10, "not a PE file")


def test_publish_refuses_an_efi_binary_of_another_os(
    root: Path, keypair: KeyPair, tmp_path: Path
) -> None:
    core, efiboot = build_payloads(tmp_path / "other", "1.0.1", os_name="otheros")
    refused(root, keypair, "1.0.1", core, efiboot, 11, "names the OS 'otheros', not 'clipos'")


def test_publish_refuses_an_efi_binary_of_another_version(
    root: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    core, _ = payloads["1.0.1"]
    _, efiboot = payloads["1.0.2"]
    refused(root, keypair, "1.0.1", core, efiboot, 11, "names version '1.0.2', not '1.0.1'")


def test_publish_refuses_an_efi_binary_pinning_another_core_version(
    root: Path, keypair: KeyPair, payloads: Payloads, tmp_path: Path
) -> None:
    """.osrel says 1.0.1, the command line boots core_1.0.0."""
    core, efiboot = payloads["1.0.1"]
    line = uki.inspect(efiboot).cmdline.replace("core_1.0.1", "core_1.0.0")
    mixed = build_uki(tmp_path / "mixed.efi", "clipos", "1.0.1", line)
    refused(root, keypair, "1.0.1", core, mixed, 11, "boots mainvg/core_1.0.0, not core_1.0.1")


def test_publish_refuses_a_core_of_another_build(
    root: Path, keypair: KeyPair, payloads: Payloads, tmp_path: Path
) -> None:
    """Same version, same size, another tree: only the root hash tells them apart."""
    _, efiboot = payloads["1.0.1"]
    core, _ = build_payloads(tmp_path / "rebuilt", "1.0.1", content="rebuilt\n")
    refused(root, keypair, "1.0.1", core, efiboot, 11, "does not match the root hash")
