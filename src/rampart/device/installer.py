"""`rampart install`: put a Rampart device on an empty disk.

Runs on the machine being installed, from the Core it installs (the installer
initramfs, `rampart build initramfs --installer`, opens that Core from the
payload disk with dm-verity and runs this in it), because creating LVM volumes
needs device-mapper. The device's own configuration decides the layout: the OS
name, volume group, Core LV size, ESP directory and boot tries come from
/usr/lib/rampart/config.toml, the version from /etc/os-release.

The payload directory (docs/formats.md, "Installation payload"):

    core-<V>.img        the Core of the running version (squashfs + verity tree)
    <os>-<V>.efi        its signed UKI; its command line's verity root
                        hash is what the written Core is checked against
    esp/                the ESP's skeleton: EFI/BOOT/BOOTX64.EFI (signed
                        systemd-boot) and loader/loader.conf (`rampart build esp`)
    remote/             the remote configuration, copied to /etc/rampart on the
                        state partition (remote.toml, rootca.pem, and root.json:
                        the TUF root a device in TUF mode pins, checked here to
                        be a root signed by its own threshold)
    ssh/<role>.pub      optional, per role of contracts/roles.py (admin, audit):
                        the keys that log in as that role over SSH, written to
                        the state partition (roles.AUTHORIZED_KEYS_DIR); without
                        them the role cannot log in

What it does, in order; every step is checked before the next:

1. refuse a target that is not a whole, unmounted disk, or that holds a
   partition table or an LVM label (unless `--wipe`), or a volume group of the
   same name that already exists; unless `--no-tpm`, refuse a machine without
   a TPM, a boot without Secure Boot (the key would be sealed to a PCR 7 the
   installed system never has), and a TPM whose rollback counter is above the
   epoch of the version being installed (it would never boot);
2. GPT: partition 1 the ESP (PARTLABEL `esp`, FAT32), partition 2 LVM
   (PARTLABEL `rampart-lvm`);
3. the volume group, `core_<V>` (the device's [core] size) and `core_state`;
4. write Core into `core_<V>`, fsync, and verify the LV with dm-verity's tree
   against the root hash on the signed UKI's command line;
5. `core_state`: LUKS2 with integrity (rampart.device.state: keyslot 0 a random
   key, keyslot 1 a new recovery passphrase), and inside it ext4 holding
   etc/rampart (the remote configuration), etc/machine-id (a new random ID),
   the roles' SSH keys and var/;
6. the ESP: FAT32 with the skeleton, the state key sealed to the TPM under
   the configured PCRs (rampart/tpm/state.pub, state.priv, state.pcrs) and
   the UKI as EFI/Linux/<os>-<V>.efi (no boot counter: there is
   nothing to fall back to).

The recovery passphrase is returned to the caller, which shows it once; it is
never logged or written anywhere.

The ESP is filled last: until it holds a boot entry, the disk does not boot.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rampart import files, run
from rampart.contracts import cmdline, layout, roles
from rampart.contracts.version import Version
from rampart.device import config as device_config
from rampart.device import identity as device_identity
from rampart.device import state, tpm, trust
from rampart.device.corewrite import core_root_hash, write_core
from rampart.device.esp import Esp
from rampart.device.slots import LvmBackend, Slot, mounted_sources, slot_name
from rampart.errors import ConflictError, FormatError, LocalError, UsageError
from rampart.files import fsync_dir

log = logging.getLogger(__name__)

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LVM_TYPE = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
ESP_PARTLABEL = "esp"
LVM_PARTLABEL = "rampart-lvm"
STATE_LV = layout.STATE_LV
INSTALL_MAPPER = "rampart-install-state"
DEFAULT_ESP_SIZE = 256 << 20
DEFAULT_STATE_SIZE = 512 << 20
MIN_ESP_SIZE = 64 << 20  # FAT32 needs 65525 clusters; 64 MiB leaves room for two UKIs
MIN_STATE_SIZE = 32 << 20
PARTITION_WAIT = 10.0  # seconds for the kernel to create the partitions' device nodes
_MIB = 1 << 20


@dataclass(frozen=True)
class Payload:
    directory: Path
    core: Path
    efiboot: Path
    esp: Path
    remote: Path
    role_keys: dict[str, str] = field(default_factory=dict)  # role -> authorized_keys


@dataclass(frozen=True)
class Installed:
    target: Path
    os_name: str
    version: str
    volume_group: str
    core_lv: str
    esp_partition: Path
    lvm_partition: Path
    machine_id: str
    root_hash: str
    recovery_passphrase: str  # shown once to the operator; never logged
    sealed_to: str | None  # the PCR selection the state key is sealed to; None: no TPM
    # the device's identity key (device/identity.py describe): kind, key_id, public_key
    identity: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "os_name": self.os_name,
            "version": self.version,
            "volume_group": self.volume_group,
            "core_lv": self.core_lv,
            "esp_partition": str(self.esp_partition),
            "lvm_partition": str(self.lvm_partition),
            "machine_id": self.machine_id,
            "root_hash": self.root_hash,
            "recovery_passphrase": self.recovery_passphrase,
            "sealed_to": self.sealed_to,
            "identity": self.identity,
        }


def find_payload(directory: Path, os_name: str, version: Version) -> Payload:
    """The payload files of `os_name` `version` in `directory` (LocalError if one is missing)."""
    payload = Payload(
        directory=directory,
        core=directory / f"core-{version.core}.img",
        efiboot=directory / f"{os_name}-{version.core}.efi",
        esp=directory / "esp",
        remote=directory / "remote",
    )
    for path, what in (
        (payload.core, "the Core image"),
        (payload.efiboot, "the signed UKI"),
        (payload.esp / "EFI/BOOT/BOOTX64.EFI", "the ESP skeleton's boot loader"),
        (payload.remote / "remote.toml", "the remote configuration"),
        (payload.remote / "rootca.pem", "the update server's root CA"),
    ):
        if not path.is_file():
            raise LocalError(f"{path}: {what} is missing from the installation payload")
    pinned = payload.remote / "root.json"
    if pinned.exists():
        from rampart.device.tufclient import check_root  # python-tuf: only with a root

        check_root(files.read_small(pinned, "TUF root", trust.ROOT_CAP), str(pinned))
    return replace(payload, role_keys=read_role_keys(directory / "ssh"))


def read_role_keys(directory: Path) -> dict[str, str]:
    """role -> its authorized_keys text, from `directory`/<role>.pub (checked: Ed25519
    keys only, no options); a missing directory or file: that role has no key. Any
    other file there is refused, so that a misspelt role is not silently dropped."""
    if not directory.is_dir():
        return {}
    known = {f"{role}.pub": role for role in roles.ROLES}
    keys: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        role = known.get(path.name)
        if role is None or not path.is_file() or path.is_symlink():
            raise LocalError(
                f"{path}: not a role's key file (the payload's ssh/ holds "
                f"{', '.join(sorted(known))})"
            )
        text = files.read_small(path, "SSH keys", roles.MAX_KEYS_BYTES).decode("utf-8", "replace")
        keys[role] = roles.authorized_keys(roles.parse_authorized_keys(text, str(path)))
    return keys


def partition_path(disk: Path, number: int) -> Path:
    """/dev/vda -> /dev/vda1; /dev/nvme0n1 -> /dev/nvme0n1p1 (the kernel's naming)."""
    sep = "p" if disk.name[-1:].isdigit() else ""
    return disk.with_name(f"{disk.name}{sep}{number}")


_SIGNATURES = (
    (510, b"\x55\xaa", "a partition table (MBR/GPT)"),
    (512, b"EFI PART", "a GPT partition table"),
    (512 + 24, b"LVM2 001", "an LVM physical volume"),
    (1024 + 0x38, b"\x53\xef", "an ext2/3/4 file system"),
    (0x8001, b"CD001", "an ISO 9660 file system"),
)


def existing_signature(head: bytes) -> str | None:
    """What the first 64 KiB of a disk show it holds, or None when they look blank."""
    for offset, magic, what in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    if any(head[i * 512 : i * 512 + 8] == b"LABELONE" for i in range(4)):
        return "an LVM physical volume"
    return None


def check_target(target: Path, wipe: bool) -> None:
    """Refuse anything but a whole, unused disk; a used one only with `wipe`."""
    try:
        info = target.stat()
    except FileNotFoundError:
        raise LocalError(f"{target}: no such device") from None
    if not stat.S_ISBLK(info.st_mode):
        raise UsageError(f"{target}: not a block device")
    sys_dir = Path(f"/sys/dev/block/{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}")
    if (sys_dir / "partition").exists():
        raise UsageError(f"{target}: is a partition; give the whole disk")
    holders = sorted(p.name for p in (sys_dir / "holders").glob("*"))
    if holders:
        raise ConflictError(f"{target}: in use by {', '.join(holders)}")
    mounted = mounted_sources()
    for path in [target, *sorted(target.parent.glob(target.name + "*"))]:
        if str(path) in mounted or os.path.realpath(path) in mounted:
            raise ConflictError(f"{target}: {path} is mounted")
    with target.open("rb") as handle:
        head = handle.read(64 << 10)
    found = existing_signature(head)
    if found is not None and not wipe:
        raise ConflictError(
            f"{target}: holds {found}; refusing to overwrite it (pass --wipe to erase the disk)"
        )


def _disk_size(target: Path) -> int:
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _wait_for(path: Path, timeout: float = PARTITION_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise LocalError(f"{path}: the partition's device node did not appear")
        time.sleep(0.2)


def _partition(target: Path, esp_size: int) -> tuple[Path, Path]:
    script = (
        "label: gpt\n"
        f'size={esp_size // 512}, type={ESP_TYPE}, name="{ESP_PARTLABEL}"\n'
        f'type={LVM_TYPE}, name="{LVM_PARTLABEL}"\n'
    )
    run.run(["sfdisk", "--quiet", "--wipe", "always", str(target)], input=script.encode())
    esp, lvm = partition_path(target, 1), partition_path(target, 2)
    _wait_for(esp)
    _wait_for(lvm)
    return esp, lvm


def _write_state(
    device: Path,
    payload: Payload,
    machine_id: str,
    fill: Callable[[Path], None] | None = None,
) -> None:
    """ext4 on the opened state volume, holding etc/rampart, etc/machine-id, the
    roles' SSH keys and var/ (and what `fill` writes, given the mount point)."""
    remote = payload.remote
    run.run(["mkfs.ext4", "-q", "-F", "-L", "state", str(device)], timeout=300)
    with tempfile.TemporaryDirectory(prefix="rampart-install-state-") as tmp:
        mount_point = Path(tmp)
        run.run(["mount", "-t", "ext4", str(device), str(mount_point)])
        try:
            etc = mount_point / "etc"
            # Explicit modes: the installer may run under umask 077, and unprivileged
            # services (systemd-networkd reads the machine ID) must traverse these.
            for directory in (etc, etc / "rampart", mount_point / "var"):
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o755)
            for source in sorted(remote.iterdir()):
                if source.is_file() and not source.is_symlink():
                    shutil.copyfile(source, etc / "rampart" / source.name)
                    (etc / "rampart" / source.name).chmod(0o644)
            (etc / "machine-id").write_text(machine_id + "\n")
            (etc / "machine-id").chmod(0o444)
            _write_role_keys(mount_point, payload.role_keys)
            if fill is not None:
                fill(mount_point)
            os.sync()
        finally:
            run.run(["umount", str(mount_point)])


def _write_role_keys(mount_point: Path, keys: dict[str, str]) -> None:
    """<state>/etc/ssh/authorized_keys/<role>, owned by root, readable (sshd's
    StrictModes checks that no one else can write them or their directories)."""
    directory = mount_point / roles.AUTHORIZED_KEYS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory.parent, directory):
        path.chmod(0o755)
    for role, text in sorted(keys.items()):
        (directory / role).write_text(text)
        (directory / role).chmod(0o644)
        log.info("install: %d SSH key(s) for the %s role", text.count("\n"), role)


class _Identity:
    """The device's identity key, made by the installation: in the TPM at once, or
    without a TPM as a key file on the state partition, once it is mounted."""

    def __init__(self, directory: Path, chip: tpm.Tpm | None) -> None:
        self.directory = directory
        self.key = None
        if chip is not None:
            log.info("install: the identity key in the TPM")
            self.key = device_identity.ensure(directory, chip)

    def on_state(self, mount_point: Path) -> None:
        if self.key is None:
            log.info("install: the identity key in %s", self.directory)
            relative = self.directory.relative_to(self.directory.anchor)
            self.key = device_identity.ensure(mount_point / relative, None)

    def describe(self) -> dict[str, str]:
        return {} if self.key is None else device_identity.describe(self.key)


def _encrypt_state(
    volume: Path,
    payload: Payload,
    machine_id: str,
    key: bytes,
    passphrase: str,
    fill: Callable[[Path], None] | None = None,
) -> None:
    """LUKS2 with integrity on `volume` (keyslot 0 `key`, keyslot 1 `passphrase`),
    then the state file system inside it (`fill`: see _write_state)."""
    state.format_volume(volume, key, passphrase)
    opened = state.activate(volume, key, INSTALL_MAPPER)
    try:
        _write_state(opened, payload, machine_id, fill)
    finally:
        state.deactivate(INSTALL_MAPPER)


def _write_esp(
    device: Path,
    skeleton: Path,
    efiboot: Path,
    os_name: str,
    version: Version,
    esp_dir: str,
    seal: Callable[[Path], None] | None,
) -> None:
    run.run(["mkfs.vfat", "-F", "32", "-n", "ESP", str(device)], timeout=300)
    with tempfile.TemporaryDirectory(prefix="rampart-install-esp-") as tmp:
        mount_point = Path(tmp)
        run.run(["mount", "-t", "vfat", "-o", "umask=0077", str(device), str(mount_point)])
        try:
            shutil.copytree(skeleton, mount_point, dirs_exist_ok=True, copy_function=shutil.copy)
            entries = mount_point / esp_dir
            entries.mkdir(parents=True, exist_ok=True)
            if seal is not None:
                seal(mount_point)
            Esp(entries, os_name).install(efiboot, version, 0)
            for directory in sorted(p for p in mount_point.rglob("*") if p.is_dir()):
                fsync_dir(directory)
            os.sync()
        finally:
            run.run(["umount", str(mount_point)])


def esp_root(esp_directory: Path) -> Path:
    """The ESP's mount point, from the device's ESP directory (/efi/EFI/Linux -> /efi)."""
    rel = _esp_relative(esp_directory)
    return Path(*esp_directory.parts[: len(esp_directory.parts) - len(Path(rel).parts)])


def _esp_relative(esp_directory: Path) -> str:
    """The device's ESP directory (like /efi/EFI/Linux) relative to the ESP's root."""
    parts = esp_directory.parts
    for i in range(len(parts) - 1, 0, -1):  # the last EFI: the mount point may be /efi
        if parts[i].upper() == "EFI":
            return "/".join(parts[i:])
    raise FormatError(f"{esp_directory}: the [efiboot] destination has no EFI directory")


def install(
    target: Path,
    payload_dir: Path,
    *,
    config_dir: Path = device_config.DEFAULT_CONFIG_DIR,
    os_release: Path = device_config.DEFAULT_OS_RELEASE,
    esp_size: int = DEFAULT_ESP_SIZE,
    state_size: int = DEFAULT_STATE_SIZE,
    wipe: bool = False,
    no_tpm: bool = False,
    efivars: Path = tpm.EFIVARS,
) -> Installed:
    """Install the running Core's version on `target` (see the module docstring)."""
    config = device_config.load_device_config(config_dir)
    version = device_config.read_os_release_version(os_release)
    if config.backend is not device_config.Backend.LVM:
        raise UsageError(f"{config_dir}/config.toml: `rampart install` needs the lvm backend")
    if esp_size < MIN_ESP_SIZE or state_size < MIN_STATE_SIZE:
        raise UsageError(
            f"the ESP needs at least {MIN_ESP_SIZE // _MIB} MiB and the state partition "
            f"{MIN_STATE_SIZE // _MIB} MiB"
        )
    esp_rel = _esp_relative(config.esp_directory)
    payload = find_payload(payload_dir, config.os_name, version)
    slot = slot_name(version)
    root = core_root_hash(payload.efiboot, slot)
    if root is None:
        raise FormatError(
            f"{payload.efiboot}: its command line carries no verity root hash; "
            "a Rampart device boots only a verified Core"
        )
    core_size = max(config.core_size, payload.core.stat().st_size)
    machine_tpm = None if no_tpm else _check_tpm(config, payload.efiboot, efivars)
    check_target(target, wipe)
    vg = config.core_destination
    vgs = run.run(["lvm", "vgs", "--noheadings", "-o", "vg_name"], check=False).stdout.decode()
    if vg in vgs.split():
        raise ConflictError(f"volume group {vg} already exists on this machine; remove it first")
    needed = esp_size + core_size + state_size + 16 * _MIB
    if _disk_size(target) < needed:
        raise LocalError(
            f"{target}: {_disk_size(target)} bytes; the installation needs at least {needed}"
        )

    log.info("install: partitioning %s", target)
    if wipe:
        run.run(["wipefs", "--all", "--quiet", str(target)])
    esp_part, lvm_part = _partition(target, esp_size)
    log.info("install: volume group %s on %s", vg, lvm_part)
    run.run(["lvm", "pvcreate", "--yes", "--force", str(lvm_part)])
    run.run(["lvm", "vgcreate", "--yes", vg, str(lvm_part)])
    backend = LvmBackend(vg)
    core_slot: Slot = backend.create(slot, core_size)
    state_slot = backend.create(STATE_LV, state_size)
    log.info("install: writing Core %s into %s", version.core, core_slot.path)
    write_core(payload.core, core_slot, b"", lambda _: None, root)
    machine_id = secrets.token_hex(16)
    key, passphrase = state.new_key(), state.new_recovery_passphrase()
    log.info(
        "install: state partition %s (LUKS2, %s with %s)",
        state_slot.path,
        state.CIPHER,
        state.INTEGRITY,
    )
    identity = _Identity(config.identity_dir, machine_tpm)
    _encrypt_state(state_slot.path, payload, machine_id, key, passphrase, identity.on_state)
    seal = None
    if machine_tpm is not None:
        log.info("install: sealing the state key to PCR %s", tpm.pcr_selection(config.tpm_pcrs))

        def seal(esp_root: Path) -> None:
            state.seal_to_esp(machine_tpm, key, esp_root, config.tpm_pcrs)

    log.info("install: ESP %s", esp_part)
    _write_esp(esp_part, payload.esp, payload.efiboot, config.os_name, version, esp_rel, seal)
    os.sync()
    return Installed(
        target=target,
        os_name=config.os_name,
        version=version.core,
        volume_group=vg,
        core_lv=slot,
        esp_partition=esp_part,
        lvm_partition=lvm_part,
        machine_id=machine_id,
        root_hash=root.root_hash,
        recovery_passphrase=passphrase,
        sealed_to=None if machine_tpm is None else tpm.pcr_selection(config.tpm_pcrs),
        identity=identity.describe(),
    )


def _mount_efivars(efivars: Path) -> None:
    """efivarfs, if this EFI machine has not mounted it (the installer's /sys)."""
    if efivars.is_dir() and not any(efivars.iterdir()):
        run.run(["mount", "-t", "efivarfs", "efivarfs", str(efivars)], check=False)


def _check_tpm(config: device_config.DeviceConfig, efiboot: Path, efivars: Path) -> tpm.Tpm:
    """The TPM the state key is sealed with, checked before the disk is touched:
    present, Secure Boot on (else PCR 7 would hold values the installed system
    never has), and a rollback counter that lets the installed version boot."""
    machine_tpm = tpm.device_tpm(config.tpm_tcti)
    if machine_tpm is None:
        raise LocalError(
            f"no TPM ({config.tpm_tcti}): the state key cannot be sealed; pass --no-tpm to "
            "install a state partition that only the recovery passphrase opens"
        )
    _mount_efivars(efivars)
    if 7 in config.tpm_pcrs and not tpm.secure_boot_enabled(efivars):
        raise LocalError(
            "Secure Boot is not enabled in this boot: the state key would be sealed to "
            "PCR 7 values the installed system never has; boot the installer with "
            "Secure Boot (or pass --no-tpm)"
        )
    epoch = cmdline.efi_epoch(efiboot)
    counter = machine_tpm.counter() or 0
    if counter > epoch:
        raise ConflictError(
            f"this TPM's rollback counter is {counter}, above the security epoch {epoch} of "
            f"{efiboot.name}: the installed system would refuse to boot; install a newer "
            "release (or clear the TPM)"
        )
    return machine_tpm


def emit(result: Installed) -> str:
    return json.dumps(result.to_json(), sort_keys=True)
