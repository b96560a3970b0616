"""`rampart boot-once`: the LoaderEntryOneShot variable, written into a directory that
stands in for efivarfs (the real one is written in the testbed, scenario 4)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rampart.contracts.version import parse_version
from rampart.device import bootonce
from rampart.device.esp import Esp
from rampart.errors import LocalError, UsageError


def _string_list(items: list[str]) -> bytes:
    return struct.pack("<I", 6) + "".join(i + "\0" for i in items).encode("utf-16-le")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Esp, Path]:
    entries = tmp_path / "esp"
    entries.mkdir()
    for name in ("clipos-1.0.1.efi", "clipos-1.0.2+2-1.efi", "clipos-1.0.3+0-3.efi"):
        (entries / name).write_bytes(b"uki")
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    bootonce.variable("LoaderEntries", efivars).write_bytes(
        _string_list(["clipos-1.0.1.efi", "clipos-1.0.2.efi", "clipos-1.0.3.efi"])
    )
    return Esp(entries, "clipos"), efivars


def test_entry_ids_drop_the_boot_counter() -> None:
    assert bootonce.entry_id("clipos-1.0.2+2-1.efi") == "clipos-1.0.2.efi"
    assert bootonce.entry_id("clipos-1.0.2+3.efi") == "clipos-1.0.2.efi"
    assert bootonce.entry_id("clipos-1.0.2.efi") == "clipos-1.0.2.efi"


def test_writes_the_attributes_and_the_utf16_id(setup: tuple[Esp, Path]) -> None:
    esp, efivars = setup
    assert bootonce.boot_once(esp, parse_version("1.0.2"), efivars) == "clipos-1.0.2.efi"
    data = bootonce.variable("LoaderEntryOneShot", efivars).read_bytes()
    assert data == b"\x07\x00\x00\x00" + "clipos-1.0.2.efi\0".encode("utf-16-le")


def test_a_version_without_an_entry_is_refused(setup: tuple[Esp, Path]) -> None:
    esp, efivars = setup
    with pytest.raises(UsageError, match=r"no boot entry for version 1\.0\.9"):
        bootonce.boot_once(esp, parse_version("1.0.9"), efivars)
    assert not bootonce.variable("LoaderEntryOneShot", efivars).exists()


def test_a_version_that_failed_to_boot_is_refused(setup: tuple[Esp, Path]) -> None:
    esp, efivars = setup
    with pytest.raises(UsageError, match="already failed to boot"):
        bootonce.boot_once(esp, parse_version("1.0.3"), efivars)


def test_an_entry_systemd_boot_did_not_list_is_refused(setup: tuple[Esp, Path]) -> None:
    esp, efivars = setup
    bootonce.variable("LoaderEntries", efivars).write_bytes(_string_list(["clipos-1.0.2.efi"]))
    with pytest.raises(LocalError, match=r"did not list clipos-1\.0\.1\.efi"):
        bootonce.boot_once(esp, parse_version("1.0.1"), efivars)


def test_not_booted_by_systemd_boot(setup: tuple[Esp, Path]) -> None:
    esp, efivars = setup
    bootonce.variable("LoaderEntries", efivars).unlink()
    with pytest.raises(LocalError, match="not booted by systemd-boot"):
        bootonce.boot_once(esp, parse_version("1.0.1"), efivars)
