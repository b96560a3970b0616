"""`rampart install` on the host: what it refuses before touching a disk, and its small
pure parts. The installation itself runs in a VM (tests/testbed: the testbed's disk is
installed by it, and every scenario boots that disk)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampart.contracts.version import parse_version
from rampart.device import installer
from rampart.errors import ConflictError, FormatError, LocalError, UsageError
from tests.contracts.test_roles import keygen


def test_partition_names_follow_the_kernel() -> None:
    assert installer.partition_path(Path("/dev/vda"), 1) == Path("/dev/vda1")
    assert installer.partition_path(Path("/dev/nvme0n1"), 2) == Path("/dev/nvme0n1p2")
    assert installer.partition_path(Path("/dev/mmcblk0"), 1) == Path("/dev/mmcblk0p1")


def test_esp_directory_is_taken_relative_to_the_last_efi_component() -> None:
    # The mount point /efi must not be mistaken for the ESP's EFI directory.
    assert installer._esp_relative(Path("/efi/EFI/Linux")) == "EFI/Linux"
    assert installer._esp_relative(Path("/boot/efi/EFI/Linux")) == "EFI/Linux"
    with pytest.raises(FormatError, match="no EFI directory"):
        installer._esp_relative(Path("/boot/Linux"))


def test_blank_disk_has_no_signature() -> None:
    assert installer.existing_signature(bytes(64 << 10)) is None


@pytest.mark.parametrize(
    ("offset", "magic", "what"),
    [
        (510, b"\x55\xaa", "partition table"),
        (512, b"EFI PART", "GPT"),
        (512 + 24, b"LVM2 001", "LVM"),
        (512, b"LABELONE", "LVM"),
        (1024 + 0x38, b"\x53\xef", "ext2/3/4"),
    ],
)
def test_used_disks_are_recognised(offset: int, magic: bytes, what: str) -> None:
    head = bytearray(64 << 10)
    head[offset : offset + len(magic)] = magic
    found = installer.existing_signature(bytes(head))
    assert found is not None and what in found


def test_a_regular_file_is_not_a_target(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(bytes(1 << 20))
    with pytest.raises(UsageError, match="not a block device"):
        installer.check_target(target, wipe=False)


def test_a_missing_target_is_named(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="no such device"):
        installer.check_target(tmp_path / "nope", wipe=False)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real block device (a loop device over a file), detached afterwards."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(8 << 20))
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(device), backing
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_a_blank_block_device_is_accepted(loop_disk: tuple[Path, Path]) -> None:
    installer.check_target(loop_disk[0], wipe=False)


def test_a_block_device_holding_a_gpt_is_refused_without_wipe(
    loop_disk: tuple[Path, Path],
) -> None:
    device, backing = loop_disk
    with backing.open("r+b") as handle:
        handle.seek(512)
        handle.write(b"EFI PART")
    subprocess.run(["blockdev", "--flushbufs", str(device)], check=True)
    with pytest.raises(ConflictError, match=r"GPT partition table.*--wipe"):
        installer.check_target(device, wipe=False)
    installer.check_target(device, wipe=True)
    assert backing.read_bytes()[512:520] == b"EFI PART"  # checking never writes


@pytest.mark.parametrize(
    "missing",
    ["core-1.0.0.img", "clipos-1.0.0.efi", "esp/EFI/BOOT/BOOTX64.EFI", "remote/remote.toml"],
)
def test_a_payload_without_one_file_is_refused_naming_it(tmp_path: Path, missing: str) -> None:
    files = [
        "core-1.0.0.img",
        "clipos-1.0.0.efi",
        "esp/EFI/BOOT/BOOTX64.EFI",
        "remote/remote.toml",
        "remote/rootca.pem",
    ]
    for name in files:
        if name != missing:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"x")
    with pytest.raises(LocalError, match=missing.rsplit("/", 1)[-1]):
        installer.find_payload(tmp_path, "clipos", parse_version("1.0.0"))


def test_the_payload_s_role_keys_are_checked_and_an_unknown_file_refused(
    tmp_path: Path,
) -> None:
    ssh = tmp_path / "ssh"
    assert installer.read_role_keys(ssh) == {}  # no ssh/: no role can log in
    ssh.mkdir()
    (ssh / "admin.pub").write_text(keygen(tmp_path, "ed25519", "admin"))
    assert list(installer.read_role_keys(ssh)) == ["admin"]
    (ssh / "auditor.pub").write_text(keygen(tmp_path, "ed25519", "auditor"))
    with pytest.raises(LocalError, match=re.escape("auditor.pub: not a role's key file")):
        installer.read_role_keys(ssh)
    (ssh / "auditor.pub").rename(ssh / "audit.pub")
    (ssh / "audit.pub").write_text(keygen(tmp_path, "rsa", "rsa"))
    with pytest.raises(FormatError, match=re.escape("audit.pub:1")):
        installer.read_role_keys(ssh)
