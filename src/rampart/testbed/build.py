"""`rampart testbed build`: everything a testbed machine boots, built with the build
pipeline's own commands and cached by the hash of its inputs.

One directory, `<cache>/testbed-<key>` (the key: SHA-256 of Rampart's source
tree, the cached Debian base, the kernel package, systemd-boot and its stub,
the OVMF variables template and the versions below), holds:

    keys/secureboot/          PK, KEK, db (rampart keys secureboot); enrolled
    keys/other/               another key set: its db signs what the firmware must refuse
    keys/vendor.key, .pub     the minisign release key (unencrypted: a test rig)
    pki/                      the update server's CA and certificate (UPDATE_HOST)
    initramfs.img             rampart build initramfs
    installer.img             rampart build initramfs --installer
    installer.efi             the installer UKI: 1.0.0's command line plus
                              rampart.install.*, with installer.img, signed by db
    releases/<V>/             core-<V>.img, core-<V>.json (rampart build core) and
                              <os>-<V>.efi (the signed UKI, as `rampart release` builds it)
    rogue/                    UKIs the firmware must refuse: unsigned.efi, and
                              other-signed.efi signed by keys/other's db (version ROGUE)
    esp-skeleton/             rampart build esp, without entries (the installer adds one)
    ovmf-vars.fd              rampart keys ovmf-vars: Secure Boot enforced
    payload.img               the installer's payload disk (ext4, docs/formats.md)
    disk.raw                  the installed disk: 1.0.0, made by `rampart install` in a VM
                              booted under Secure Boot with a TPM
    tpm-state/                that VM's swtpm state: the TPM the state key is sealed
                              to (each guest boots with a copy: the same machine)
    recovery-passphrase       the passphrase the installer showed (mode 0600; a test
                              rig keeps it so that the scenarios can type it)
    testbed.json              what was built, with timings

VERSIONS are built from one root tree each; BROKEN's health check fails. The
directory is made under a temporary name and renamed when complete, so an
interrupted build starts over and a complete one is reused as is. Older
testbed directories are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rampart import files, run
from rampart.contracts import cmdline, coremeta, pe, roles, signing
from rampart.contracts.version import parse_version
from rampart.errors import LocalError
from rampart.release import core, initramfs, secureboot, uki
from rampart.release import hardening as release_hardening
from rampart.testbed import rootfs, services

log = logging.getLogger(__name__)

OS_NAME = rootfs.DEFAULT_OS_NAME
VERSIONS = ("1.0.0", "1.0.1", "1.0.2", "1.0.3")
INSTALLED = "1.0.0"
BROKEN = "1.0.3"  # its health check fails: boot counting falls back
# The security epoch of each release (rampart.epoch on its signed command line).
EPOCHS = {"1.0.0": 0, "1.0.1": 1, "1.0.2": 2, "1.0.3": 3}
# The testbed's Cores are zstd-compressed squashfs (64 MB, not 192 MB uncompressed):
# under TCG every byte of an update costs TLS, dm-crypt and dm-integrity in software
# on the guest's side, and an update of the uncompressed Core took 2 min; reading
# the compressed Core at boot costs little (the kernel's zstd is built in).
CORE_COMPRESSION = "zstd"
# No menu at boot (a held key still shows it): the scenarios choose entries with
# `rampart boot-once`, and some 25 boots a run would each wait out a timeout.
MENU_TIMEOUT = 0
ROGUE = "0.0.1"  # the version of the refused UKIs: never a default boot entry
SERVER_PORT = 47443  # rampart serve listens here on the host's loopback
# console: the driver's channel; panic=10: a failed initramfs reboots, so that
# systemd-boot counts the try down and falls back.
EXTRA_CMDLINE = ("console=ttyS0,115200", "panic=10")
DISK_SIZE = 4 << 30
INSTALL_TIMEOUT = 900.0
_KEY_FILES = ("vendor.key", "vendor.pub")


@dataclass(frozen=True)
class Testbed:
    """The paths of one complete testbed build."""

    directory: Path

    @property
    def keys(self) -> Path:
        return self.directory / "keys/secureboot"

    @property
    def other_keys(self) -> Path:
        return self.directory / "keys/other"

    @property
    def vendor_key(self) -> Path:
        return self.directory / "keys/vendor.key"

    @property
    def vendor_pub(self) -> Path:
        return self.directory / "keys/vendor.pub"

    def role_key(self, role: str) -> Path:
        """The private SSH key of a role (contracts/roles.py); its public key, beside
        it with .pub, is in the installation payload."""
        return self.directory / f"keys/roles/{role}"

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    @property
    def ovmf_vars(self) -> Path:
        return self.directory / "ovmf-vars.fd"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def tpm_state(self) -> Path:
        return self.directory / "tpm-state"

    @property
    def installer_uki(self) -> Path:
        return self.directory / "installer.efi"

    @property
    def recovery_passphrase(self) -> str:
        return (self.directory / "recovery-passphrase").read_text().strip()

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    def core(self, version: str) -> Path:
        return self.directory / f"releases/{version}/core-{version}.img"

    def core_meta(self, version: str) -> Path:
        return self.directory / f"releases/{version}/core-{version}.json"

    def efiboot(self, version: str) -> Path:
        return self.directory / f"releases/{version}/{OS_NAME}-{version}.efi"

    def hardening_report(self, version: str) -> Path:
        """The kernel hardening audit of the release as built (`rampart hardening`)."""
        return release_hardening.report_path(
            self.directory / f"releases/{version}", parse_version(version)
        )

    def manifest(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.directory / "testbed.json").read_text())
        return doc


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo") or not path.is_file():
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(core.file_sha256(path).encode())
    return digest.hexdigest()


def cache_key(checkout: Path, base: Path, kernel_deb: Path) -> str:
    """SHA-256 of every input of the testbed build."""
    inputs = {
        "source": _tree_digest(checkout / "src/rampart"),
        "base": base.name,
        "kernel_deb": kernel_deb.name,
        "kernel_size": kernel_deb.stat().st_size,
        "systemd_boot": core.file_sha256(secureboot.SYSTEMD_BOOT),
        "stub": core.file_sha256(uki.STUB),
        "ovmf_vars": core.file_sha256(secureboot.OVMF_VARS_TEMPLATE),
        "versions": list(VERSIONS),
        "broken": BROKEN,
        "installed": INSTALLED,
        "cmdline": list(EXTRA_CMDLINE),
        "epochs": EPOCHS,
        "port": SERVER_PORT,
        # The device's libraries copied into Core (rootfs.DEVICE_LIBRARIES).
        "libraries": {
            name: _tree_digest(rootfs.library_dir(name)) for name in rootfs.DEVICE_LIBRARIES
        },
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# --- the update server's PKI -------------------------------------------------------


def make_pki(directory: Path, host: str = rootfs.UPDATE_HOST) -> None:
    """ca.pem/ca.key and server.pem/server.key for `host`, the mirror's name
    (rootfs.MIRROR_HOST: the admin role points the device there), localhost and
    127.0.0.1, valid ten years (a cached testbed is used for long)."""
    valid = services.validity(3650)
    ca = services.make_ca(directory, "ca", common_name="Rampart testbed CA", valid=valid)
    names = [host, rootfs.MIRROR_HOST, "localhost", "127.0.0.1"]
    services.make_cert(directory, "server", ca, names, valid=valid)


def make_role_keys(bed: Testbed) -> None:
    """An Ed25519 key per role (ssh-keygen, no passphrase: a test rig's)."""
    for role in roles.ROLES:
        path = bed.role_key(role)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{role}@testbed"]
        run.run([*argv, "-f", str(path)], timeout=60)


def remote_toml(host: str = rootfs.UPDATE_HOST, port: int = SERVER_PORT) -> str:
    return (
        "# The testbed's update server: `rampart serve` on the host's loopback.\n"
        f'update_url = "https://{host}:{port}/update/v1"\n'
        f'dist_url = "https://{host}:{port}/dist"\n'
    )


# --- the build -----------------------------------------------------------------------


@dataclass
class _Clock:
    timings: dict[str, float]

    def __init__(self) -> None:
        self.timings = {}

    def step(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 1)
        log.info("testbed build: %s in %.0f s", name, self.timings[name])


def _kernel_image(checkout: Path) -> Path:
    kernel = checkout / ".cache/kernel/vmlinuz"
    if not kernel.is_file():
        raise LocalError(f"{kernel}: the guest kernel is missing; run `make setup`")
    return kernel


def _build_release(
    bed: Testbed,
    work: Path,
    checkout: Path,
    cache_dir: Path,
    version: str,
    kernel: Path,
    modules: initramfs.KernelModules,
) -> None:
    health = rootfs.FAILING if version == BROKEN else rootfs.HEALTHY
    tree = rootfs.build_rootfs(
        version,
        work,
        cache_dir,
        checkout,
        pubkey=bed.vendor_pub,
        health_check=health,
        kernel=modules,
    )
    out = bed.core(version).parent
    out.mkdir(parents=True, exist_ok=True)
    try:
        core.build_core(tree, parse_version(version), out, compression=CORE_COMPRESSION)
        _build_efiboot(bed, version, kernel)
        # What the guest's `rampart hardening check --running` must find (scenario 1).
        efiboot = bed.efiboot(version)
        line = pe.cmdline(efiboot.read_bytes(), str(efiboot)) or ""
        audit = release_hardening.audit_release(tree, line, out, parse_version(version))
        release_hardening.record(out, parse_version(version), audit)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _build_efiboot(bed: Testbed, version: str, kernel: Path) -> None:
    uki.build_efiboot(
        bed.efiboot(version),
        coremeta.read_pins(bed.core_meta(version)),
        vg=rootfs.VOLUME_GROUP,
        version=version,
        os_name=OS_NAME,
        kernel=kernel,
        initrd=bed.directory / "initramfs.img",
        extra=list(EXTRA_CMDLINE),
        epoch=EPOCHS[version],
        sign_key=bed.keys / "db.key",
        sign_cert=bed.keys / "db.crt",
    )


def rogue(bed: Testbed, name: str) -> Path:
    return bed.directory / "rogue" / name


def _build_rogue(bed: Testbed) -> None:
    """An unsigned UKI, and one signed by a db key the firmware does not hold."""
    bed.directory.joinpath("rogue").mkdir()
    meta = coremeta.read_pins(bed.core_meta(INSTALLED))
    for name, keys in (("unsigned.efi", None), ("other-signed.efi", bed.other_keys)):
        uki.build_efiboot(
            rogue(bed, name),
            meta,
            vg=rootfs.VOLUME_GROUP,
            version=ROGUE,
            os_name=OS_NAME,
            kernel=bed.kernel,
            initrd=bed.directory / "initramfs.img",
            extra=list(EXTRA_CMDLINE),
            sign_key=None if keys is None else keys / "db.key",
            sign_cert=None if keys is None else keys / "db.crt",
        )


def renamed_loader(out: Path, keys_dir: Path, version: str) -> Path:
    """Debian's systemd-boot with its version strings (`.sdmagic`, `.osrel`, `.sbat`
    and the LoaderInfo it sets) replaced by `version`, of the same length as the
    installed one's, then signed with the db key of `keys_dir`: a "newer" boot loader
    for the boot loader update tests, which Debian 12 has only one build of."""
    from rampart.contracts import bootloader

    original = secureboot.SYSTEMD_BOOT.read_bytes()
    installed = bootloader.loader_info(original, str(secureboot.SYSTEMD_BOOT)).split(" ", 1)[1]
    if len(version) != len(installed):
        raise LocalError(f"loader version {version!r}: not as long as {installed!r}")
    patched = original.replace(installed.encode(), version.encode()).replace(
        installed.encode("utf-16-le"), version.encode("utf-16-le")
    )
    unsigned = out.with_name(f".{out.name}.unsigned")
    unsigned.write_bytes(patched)
    try:
        keys = secureboot.KeySet(keys_dir)
        uki.sign_copy(unsigned, out, keys.key("db"), keys.cert("db"))
    finally:
        unsigned.unlink(missing_ok=True)
    return out


def _payload_disk(bed: Testbed, work: Path) -> Path:
    """The installer's payload (docs/formats.md), as an ext4 image made by mke2fs -d."""
    tree = work / "payload"
    (tree / "remote").mkdir(parents=True)
    shutil.copyfile(bed.core(INSTALLED), tree / bed.core(INSTALLED).name)
    shutil.copyfile(bed.efiboot(INSTALLED), tree / bed.efiboot(INSTALLED).name)
    shutil.copytree(bed.directory / "esp-skeleton", tree / "esp")
    (tree / "remote/remote.toml").write_text(remote_toml())
    shutil.copyfile(bed.pki / "ca.pem", tree / "remote/rootca.pem")
    (tree / "ssh").mkdir()
    for role in roles.ROLES:
        shutil.copyfile(f"{bed.role_key(role)}.pub", tree / f"ssh/{role}.pub")
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    image = bed.directory / "payload.img"
    size_mib = used // (1 << 20) + 64
    run.run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "payload",
            "-d",
            str(tree),
            str(image),
            f"{size_mib}M",
        ],
        timeout=600,
    )
    shutil.rmtree(tree)
    return image


# The state partition at half the installer's default: luksFormat writes all of it
# through dm-integrity, at about 5 MB/s under TCG (96 s of a 162 s installation at
# 512M); the scenarios' downloads (a Core and its verified copy) fit in 256M.
STATE_SIZE = "256M"
INSTALL_PARAMS = (
    f"{cmdline.INSTALL_TARGET_PARAM}=/dev/vda",
    f"{cmdline.INSTALL_PAYLOAD_PARAM}=/dev/vdb",
    f"{cmdline.INSTALL_STATE_SIZE_PARAM}={STATE_SIZE}",
)
_RECOVERY = re.compile(r"Recovery passphrase of the state partition[^\n]*\n\s*([a-z-]{40,})\s")


def _build_installer_uki(bed: Testbed) -> None:
    """The installer as installation media would carry it: a UKI signed by db, so
    that it boots under Secure Boot and seals the state key to the PCR 7 value the
    installed system will have (the same firmware keys, the same signer)."""
    uki.build_efiboot(
        bed.installer_uki,
        coremeta.read_pins(bed.core_meta(INSTALLED)),
        vg=rootfs.VOLUME_GROUP,
        version=INSTALLED,
        os_name=OS_NAME,
        kernel=bed.kernel,
        initrd=bed.directory / "installer.img",
        extra=[*EXTRA_CMDLINE, *INSTALL_PARAMS],
        epoch=EPOCHS[INSTALLED],
        sign_key=bed.keys / "db.key",
        sign_cert=bed.keys / "db.crt",
    )


def _install(bed: Testbed, work: Path, time_factor: float = 1.0) -> float:
    """Boot the installer UKI (OVMF, Secure Boot, swtpm) with a blank disk and the
    payload disk; keep its TPM state and the recovery passphrase; return seconds.
    `time_factor` multiplies the waits (a busy host: rampart.testbed.machine)."""
    from rampart.testbed import machine

    disk = bed.disk
    with disk.open("wb") as handle:
        handle.truncate(DISK_SIZE)
    vars_copy = work / "install-vars.fd"
    shutil.copyfile(bed.ovmf_vars, vars_copy)
    tpm_dir = work / "install-tpm"
    tpm_dir.mkdir(mode=0o700)
    started = time.monotonic()
    vm = machine.Machine(
        work / "install-vm",
        disks=[
            machine.Disk(disk, "raw"),
            machine.Disk(bed.directory / "payload.img", "raw", read_only=True),
        ],
        firmware=machine.SecureBoot(vars_copy, kernel=bed.installer_uki),
        tpm_state=tpm_dir,
        network=False,
        time_factor=time_factor,
    )
    log_copy = bed.directory.parent / "testbed-install.log"
    with vm:
        vm.start()
        try:
            match = vm.expect(r"rampart-install: (done|failed[^\n]*)\n", INSTALL_TIMEOUT)
        except machine.ConsoleError as exc:  # the installer's initramfs stopped (or a timeout)
            shutil.copyfile(vm.console_log, log_copy)
            raise LocalError(f"the installer did not finish: {exc} (console: {log_copy})") from None
        if match.group(1) != "done":
            shutil.copyfile(vm.console_log, log_copy)
            raise LocalError(f"the installer {match.group(1)} (console: {log_copy})")
        found = _RECOVERY.search(vm.console_text)
        if found is None:
            raise LocalError("the installer showed no recovery passphrase")
        files.write_new_file(
            bed.directory / "recovery-passphrase", (found.group(1) + "\n").encode(), 0o600
        )
        if not vm.shutdown_wait(60):
            raise LocalError("the installer did not power the machine off")
    shutil.copytree(tpm_dir, bed.tpm_state)
    bed.tpm_state.chmod(0o700)
    return time.monotonic() - started


def _stale(cache_dir: Path, keep: Path) -> Iterator[Path]:
    for path in cache_dir.glob("testbed-*"):
        if path != keep and path.is_dir():
            yield path


def build(
    checkout: Path,
    cache_dir: Path | None = None,
    *,
    kernel_deb: Path | None = None,
    time_factor: float = 1.0,
) -> Testbed:
    """The testbed for `checkout`, from the cache when its inputs have not changed;
    `time_factor` multiplies the installation's waits (a busy host)."""
    if os.geteuid() != 0:
        raise LocalError("building the testbed needs root (debootstrap, chroot)")
    cache_dir = cache_dir or initramfs.default_cache_dir()
    kernel = _kernel_image(checkout)
    deb = kernel_deb or initramfs.default_kernel_deb(cache_dir)
    base = rootfs.ensure_base(cache_dir, rootfs.apt_mirror())
    key = cache_key(checkout, base, deb)
    # One build per cache at a time: a second caller (a parallel test worker, another
    # `rampart testbed build`) waits and then finds the testbed in the cache.
    with files.locked(cache_dir / ".testbed.lock"):
        return _build_locked(checkout, cache_dir, kernel, deb, base, key, time_factor)


def _build_locked(
    checkout: Path,
    cache_dir: Path,
    kernel: Path,
    deb: Path,
    base: Path,
    key: str,
    time_factor: float,
) -> Testbed:
    final = cache_dir / f"testbed-{key[:16]}"
    if (final / "testbed.json").is_file():
        log.info("testbed build: from the cache, %s", final)
        return Testbed(final)
    started = time.monotonic()
    clock = _Clock()
    tmp = Path(tempfile.mkdtemp(prefix=".rampart-build-testbed-", dir=cache_dir))
    bed = Testbed(tmp)
    work = tmp / "work"
    work.mkdir()
    try:
        step = time.monotonic()
        (tmp / "keys").mkdir()
        secureboot.generate_keys(bed.keys, "Rampart testbed")
        secureboot.generate_keys(bed.other_keys, "Not enrolled")
        signing_key = signing.generate_secret_key()
        files.write_new_file(bed.vendor_key, signing.secret_key_to_bytes(signing_key, None), 0o600)
        bed.vendor_pub.write_bytes(signing_key.public_key.to_bytes())
        make_pki(bed.pki)
        make_role_keys(bed)
        secureboot.ovmf_vars(bed.keys, bed.ovmf_vars)
        shutil.copyfile(kernel, bed.kernel)
        clock.step("keys", step)

        step = time.monotonic()
        initramfs.build_initramfs(tmp / "initramfs.img", deb)
        initramfs.build_initramfs(tmp / "installer.img", deb, installer=True)
        clock.step("initramfs", step)

        modules = initramfs.unpack_kernel(deb, work / "kernel")
        for version in VERSIONS:
            step = time.monotonic()
            _build_release(bed, work, checkout, cache_dir, version, bed.kernel, modules)
            clock.step(f"release {version}", step)

        step = time.monotonic()
        _build_rogue(bed)
        _build_installer_uki(bed)
        secureboot.build_esp(tmp / "esp-skeleton", bed.keys, menu_timeout=MENU_TIMEOUT)
        _payload_disk(bed, work)
        clock.step("payload", step)

        step = time.monotonic()
        _install(bed, work, time_factor)
        clock.step("install", step)

        shutil.rmtree(work)
        manifest = {
            "key": key,
            "os_name": OS_NAME,
            "versions": list(VERSIONS),
            "installed": INSTALLED,
            "broken": BROKEN,
            "epochs": EPOCHS,
            "port": SERVER_PORT,
            "update_host": rootfs.UPDATE_HOST,
            "timings": clock.timings,
            "seconds": round(time.monotonic() - started, 1),
        }
        (tmp / "testbed.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in _stale(cache_dir, final):
        shutil.rmtree(stale, ignore_errors=True)
    log.info("testbed build: done in %.0f s, %s", time.monotonic() - started, final)
    return Testbed(final)
