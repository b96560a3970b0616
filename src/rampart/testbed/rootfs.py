"""The testbed's root tree: Debian bookworm from debootstrap, configured as a CLIP OS
device running Rampart from this checkout. `rampart build core` turns it into a Core.

Two stages:

1. The base (slow, about a minute): `debootstrap --variant=minbase` with the packages
   in PACKAGES from the Debian mirror apt uses on this machine, trimmed of
   documentation, manual pages, translations and apt's caches, with every Python
   module precompiled in checked-hash mode (Core's timestamps are all 0 and `/` is
   read-only, so timestamp-checked .pyc files would be recompiled at every start).
   Cached as `<cache_dir>/rootfs-bookworm-<key>.tar`, where the key is the SHA-256 of
   the suite, variant, architecture, package list, mirror and this module's source:
   debootstrap runs once per key.
2. The device (fast, a few seconds), applied to a fresh copy of the base for each
   version:
   - /etc/os-release (-> /usr/lib/os-release) with VERSION_ID and IMAGE_VERSION;
   - Rampart from the checkout's src/rampart in /usr/lib/python3/dist-packages (with
     Debian's python3-cryptography; no pip, no virtual environment), /usr/bin/rampart,
     and its pure-Python dependencies Debian 12 lacks (python-tuf, securesystemslib,
     urllib3: DEVICE_LIBRARIES), copied from the interpreter that builds the testbed;
   - /usr/lib/rampart: config.toml (lvm backend, VG mainvg, ESP /efi/EFI/Linux,
     boot_tries BOOT_TRIES), the pubkey when given, and `health-check`, the script
     rampart-health.service runs before boot-complete.target (HEALTHY by default,
     FAILING for a version that must roll back: a failure reboots the machine);
   - /etc/rampart and /etc/machine-id: symlinks into the state partition, which the
     initramfs mounts on /mnt/state; the first boot's machine ID is written there by
     rampart-machine-id-commit.service (systemd's own commit needs a writable /etc);
   - the writable places of a read-only `/`: /tmp is a tmpfs; /var is bound from
     /mnt/state/var (made by rampart-state-layout.service; the journal persists
     there); LVM keeps its metadata backups in /run/lvm; the ESP (GPT partition
     name ESP_PARTLABEL) is mounted on /efi (nofail, waiting up to ESP_DEVICE_TIMEOUT
     for its device), and the GPT auto-generator and the first-boot prompts are
     masked; every device gets DEVICE_TIMEOUT to show up (systemd.conf.d), not 90 s;
   - rampart-update.timer, rampart-mark-good.service and rampart-health.service
     enabled, the rampart-fetch user created from the sysusers file (at build time:
     /etc is read-only at boot); Debian's apt, dpkg and e2scrub timers disabled. The
     device's units come from the checkout's rampart/data/systemd, the testbed's own
     (TESTBED_UNITS) from rampart/data/testbed;
   - no interactive root: every password locked (lock_accounts), so the getty on
     the serial console ttyS0 refuses root; no emergency or rescue shell: a boot that
     lands there says so on the console and reboots (NO_SHELL_UNITS); root logged in
     automatically, with the prompt PROMPT, on the testbed's probe only (PROBE_TTY, a
     virtio console, the test driver's channel: machine.Machine(probe=True));
     systemd-networkd with DHCP on the Ethernet links (QEMU user networking), its DNS
     server in resolv.conf, and UPDATE_HOST in /etc/hosts at the host's address as
     QEMU shows it;
   - the kernel hardening audit's sysctl settings (HARDENING_SYSCTL_PATH) and, when
     the kernel is given, its configuration in /boot/config-<release>;
   - fdisk, dosfstools and e2fsprogs, for `rampart install`;
   - the IPsec gateway's tools (strongSwan with swanctl and charon-systemd, its
     unit masked, and its user strongswan; nftables; iproute2) and, when the kernel is
     given, its modules (CORE_MODULES and their dependencies, indexed by depmod) in
     /lib/modules.

The tree is built under a temporary name next to its final place and renamed last;
the cached tarball likewise. Needs root (debootstrap, chroot).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from rampart import files, run
from rampart.contracts import layout
from rampart.contracts.version import Version, parse_version
from rampart.contracts.wire import check_name
from rampart.errors import LocalError, UsageError
from rampart.release import initramfs

log = logging.getLogger(__name__)

SUITE = "bookworm"
VARIANT = "minbase"
# debootstrap does not resolve virtual packages: python3-cryptography depends on
# python3-cffi-backend-api-min/-max, which python3-cffi-backend provides.
PACKAGES = (
    "python3",
    "python3-cryptography",
    "python3-cffi-backend",
    # BLAKE2b at libsodium's speed (contracts/hashing.py), on the system's libsodium.
    "python3-nacl",
    # zstd chunks of incremental updates (contracts/chunks.py).
    "python3-zstandard",
    # tpm2_eventlog's YAML, to predict PCR 7 (device/pcr7.py).
    "python3-yaml",
    "systemd-sysv",
    "lvm2",
    "cryptsetup-bin",
    "udev",
    "tpm2-tools",
    "ca-certificates",
    # `rampart install` runs from the Core it installs: sfdisk, mkfs.vfat, mkfs.ext4.
    "fdisk",
    "dosfstools",
    "e2fsprogs",
    # Boot loader updates (`rampart bootloader install`): sbverify checks the loader
    # against the firmware's db, efibootmgr adds the boot option of its main copy.
    "sbsigntool",
    "efibootmgr",
    # The IPsec gateway (`rampart gateway`): strongSwan with swanctl and charon-systemd,
    # nftables, iproute2 for namespaces and XFRM interfaces, kmod to load the modules
    # below. strongswan.service is masked: this Core is not a gateway (MASKED).
    "kmod",
    "iproute2",
    "iputils-ping",
    "nftables",
    "strongswan-swanctl",
    "charon-systemd",
    "libstrongswan-standard-plugins",
    # The admin and audit roles (docs/hardening.md "Roles"): sshd, with the keys the
    # installer wrote on the state partition, and sudo's rules for exact commands.
    "openssh-server",
    "sudo",
)
GATEWAY_SYSUSERS = (
    "rampart-gateway.conf",
    'u strongswan - "strongSwan IKE daemon (Rampart gateway)" /nonexistent /usr/sbin/nologin\n',
)
# Kernel modules in Core (with their dependencies and depmod's indexes; the initramfs
# has its own): XFRM interfaces and ESP with AES-GCM or AES-CTR + HMAC-SHA-256 and
# extended sequence numbers (authencesn), nftables with conntrack, xfrm, socket, limit
# and log matches, the default RNG, veth for the gateway test's namespaces.
CORE_MODULES = (
    "xfrm_interface",
    "xfrm_user",
    "esp4",
    "esp6",
    "gcm",
    "ctr",
    "ghash_generic",
    "authenc",
    "authencesn",
    "seqiv",
    "echainiv",
    # seqiv/echainiv seed their IVs from the default RNG (stdrng): without drbg
    # every ESP SA fails with ENOENT ("unable to initialize cryptographic operations").
    "drbg",
    "jitterentropy_rng",
    "nf_tables",
    "nf_conntrack",
    "nft_ct",
    "nft_xfrm",
    "nft_socket",
    "nft_limit",
    "nft_log",
    "nf_log_syslog",
    "veth",
    # The testbed's probe (machine.Machine(probe=True)): a virtio console, /dev/hvc0.
    "virtio_console",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_OS_NAME = "clipos"
VOLUME_GROUP = "mainvg"
ESP_MOUNT = "/efi"
ESP_DIRECTORY = f"{ESP_MOUNT}/EFI/Linux"
ESP_PARTLABEL = layout.ESP_PARTLABEL  # the GPT partition name the installer gives the ESP
STATE_MOUNT = layout.STATE_MOUNT  # where the initramfs mounts the state partition
# Two tries (systemd's default is three): the fallback is the same, and each try of
# the broken version is a whole boot of the automatic rollback scenario.
BOOT_TRIES = 2
PROMPT = "rampart-guest# "  # root's shell prompt on the probe
SERIAL_TTY = "ttyS0"  # the serial console: kernel messages, and a login nobody passes
PROBE_TTY = "hvc0"  # the testbed's probe, a virtio console: root's shell
QEMU_USER_DNS = "10.0.2.3"  # the DNS server of QEMU's user-mode networking
QEMU_USER_HOST = "10.0.2.2"  # the host's loopback, seen from the guest
UPDATE_HOST = "updates.rampart.test"  # the update server's name in the testbed (/etc/hosts)
MIRROR_HOST = "mirror.rampart.test"  # another name of it, which the admin role switches to

HEALTHY = """\
#!/bin/sh
# The running version's health check (rampart-health.service, before
# boot-complete.target). Exit 0: healthy, `rampart mark-good` removes the boot
# counter. Anything else: the machine reboots, and systemd-boot falls back to the
# previous version once the boot tries are spent.
exit 0
"""

FAILING = """\
#!/bin/sh
# A deliberately broken version (testbed): its health check always fails, so it is
# never marked good and systemd-boot falls back to the previous version.
echo "rampart-health: this version is broken on purpose (testbed)" >&2
exit 1
"""

_TMP = ".rampart-build-"
_UNIT_DIR = "usr/lib/systemd/system"
_GUEST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}
_TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")
_PROXY_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

# Removed from the base: nothing on a device reads them (copyright files are kept).
_TRIM_DIRS = ("usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")
_TRIM_CONTENTS = ("var/cache/apt/archives", "var/lib/apt/lists", "var/log")
# Enabled by Debian's packages, wrong on a read-only image: apt and dpkg
# maintenance, and e2scrub, which would make snapshot LVs in the slots' VG.
_DISABLED = (
    "timers.target.wants/apt-daily.timer",
    "timers.target.wants/apt-daily-upgrade.timer",
    "timers.target.wants/dpkg-db-backup.timer",
    "timers.target.wants/e2scrub_all.timer",
    "timers.target.wants/fstrim.timer",
    "multi-user.target.wants/e2scrub_reap.service",
    "multi-user.target.wants/strongswan.service",
    "multi-user.target.wants/strongswan-starter.service",
    # No logins on the virtual terminals: root is locked and there are no other
    # interactive accounts (getty-static, its fallback, is masked: MASKED).
    "getty.target.wants/getty@tty1.service",
)
# Where the roles' configuration goes (rampart/data/roles), each checked at build
# time by the tool that reads it (sshd -t, visudo -c).
SSHD_CONF_PATH = "etc/ssh/sshd_config.d/50-rampart.conf"
SUDOERS_PATH = "etc/sudoers.d/rampart-roles"
# Units of Debian's packages a Core never runs, masked: each would otherwise be
# a loaded, unconfined service (`rampart hardening exposure`).
MASKED = (
    "getty-static.service",  # gettys on tty2-tty6 when there is no logind
    "rc-local.service",  # /etc/rc.local: / is read-only, there is none
    # charon without the confinement of the gateway's drop-in: 9.6 where its goal is
    # 2.2. This Core is not a gateway; a gateway's Core is built with its rendered
    # files, the drop-in among them, and enables it (docs/gateway.md).
    "strongswan.service",
    "strongswan-starter.service",  # ipsec.conf's starter: a Core uses swanctl
)

# No emergency or rescue shell: each reboots instead (rampart/data/hardening/no-shell.conf,
# a drop-in for both).
NO_SHELL_UNITS = ("emergency.service", "rescue.service")
NO_SHELL_DROPIN = "50-rampart.conf"

# The testbed's own systemd units, in rampart/data/testbed (package data): file ->
# where it goes in the tree. `@NAME@` placeholders in them are filled from UNIT_VALUES.
TESTBED_UNITS = {
    # The running version's health check, before boot-complete.target.
    "rampart-health.service": f"{_UNIT_DIR}/rampart-health.service",
    # The state partition's directories that Core points into.
    "rampart-state-layout.service": f"{_UNIT_DIR}/rampart-state-layout.service",
    # Runs COMMIT_MACHINE_ID (below) on the first boot.
    "rampart-machine-id-commit.service": f"{_UNIT_DIR}/rampart-machine-id-commit.service",
    # A drop-in: root logged in on the probe, the test driver's channel.
    "autologin.conf": f"etc/systemd/system/serial-getty@{PROBE_TTY}.service.d/autologin.conf",
}
UNIT_VALUES = {"@STATE_MOUNT@": STATE_MOUNT}


def testbed_unit(name: str) -> str:
    """The unit file `name` of rampart/data/testbed, filled in (UNIT_VALUES)."""
    text = (resources.files("rampart") / "data" / "testbed" / name).read_text(encoding="utf-8")
    return initramfs.render(text, UNIT_VALUES)


COMMIT_MACHINE_ID = f"""\
#!/bin/sh
# /etc/machine-id is a symlink to the state partition, and /etc is read-only: on the
# first boot, systemd mounts a transient ID over {STATE_MOUNT}/etc/machine-id and
# systemd-machine-id-commit.service (which needs a writable /etc) leaves it there.
# Write it to the state partition, so that the machine keeps its identity.
set -eu
file={STATE_MOUNT}/etc/machine-id
id=$(cat "$file")
if ! printf '%s' "$id" | grep -Eqx '[0-9a-f]{{32}}'; then
    echo "rampart: the transient machine ID is not one: $id" >&2
    exit 1
fi
umount "$file"
printf '%s\\n' "$id" >"$file.tmp"
chmod 0444 "$file.tmp"
sync "$file.tmp"
mv -f "$file.tmp" "$file"
sync {STATE_MOUNT}/etc
"""

# How long systemd waits for the ESP's device (/dev/disk/by-partlabel/<ESP_PARTLABEL>)
# before it gives up on mounting it. The device shows up once udev's coldplug, after
# the switch to Core, has probed the disk: seconds on an idle machine, but more than
# the 20 s this once was under TCG on a busy host, and the ESP then stayed unmounted
# for the whole boot (mark-good could not bless the entry). `nofail` keeps the wait
# off the boot's critical path, so the timeout only ends a wait for an ESP that is
# really missing: sized for slow media.
ESP_DEVICE_TIMEOUT = "5min"
ESP_OPTIONS = f"umask=0077,nofail,x-systemd.device-timeout={ESP_DEVICE_TIMEOUT}"

# How long systemd waits for any device before it fails the units bound to it (90 s by
# default). On a busy host the guest's udev started 40 s after systemd and its
# coldplug ran past 90 s: /dev/ttyS0's job timed out, serial-getty@ttyS0 (the test
# driver's shell, a person's console) failed for the whole boot. Sized for slow media
# like the ESP's own timeout; a device that never comes still fails, later.
DEVICE_TIMEOUT = "5min"
SYSTEM_CONF = f"""\
# Rampart Core: devices may show up late on slow media or a busy host.
[Manager]
DefaultDeviceTimeoutSec={DEVICE_TIMEOUT}
"""
SYSTEM_CONF_PATH = "usr/lib/systemd/system.conf.d/50-rampart.conf"
# The Core's sysctl settings (rampart/data/hardening/sysctl.conf, after the audit's
# recommendations), which systemd-sysctl applies at boot.
HARDENING_SYSCTL_PATH = "usr/lib/sysctl.d/50-rampart-hardening.conf"

FSTAB = f"""\
# Rampart Core: / is the dm-verity device, read-only, mounted by the initramfs,
# which also opens core_state and mounts it on {STATE_MOUNT}. The ESP is nofail (a
# boot without it still comes up), with a device timeout for slow media;
# rampart-mark-good.service is ordered after its mount.
tmpfs  /tmp  tmpfs  mode=1777,nosuid,nodev,size=50%  0 0
{STATE_MOUNT}/var  /var  none  bind,x-systemd.requires=rampart-state-layout.service  0 0
PARTLABEL={ESP_PARTLABEL}  {ESP_MOUNT}  vfat  {ESP_OPTIONS}  0 0
"""

BASHRC = f"""\
# Rampart testbed: root's shell on the serial console, driven by a program. A fixed
# prompt to wait for, no history file (/root is read-only), no line wrapping, no
# colours or pager in systemd's tools.
PS1='{PROMPT}'
PS2='> '
unset HISTFILE PROMPT_COMMAND
export SYSTEMD_COLORS=0 SYSTEMD_PAGER= SYSTEMD_URLIFY=0 PAGER=cat
[ -t 0 ] && stty cols 1000 rows 50 2>/dev/null
"""

NETWORK = """\
# QEMU user-mode networking: DHCP on every Ethernet link.
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
"""

LAUNCHER = """\
#!/usr/bin/python3
\"\"\"Rampart's command line (installed from a checkout by the testbed).\"\"\"

import sys

from rampart.cli import main

sys.exit(main())
"""


# --- the mirror ----------------------------------------------------------------------


def _one_line_sources(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        kind, rest = fields[0], fields[1:]
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            yield [kind], [rest[0]], [rest[1]], rest[2:]


def _deb822_sources(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    paragraphs: list[dict[str, str]] = [{}]
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if paragraphs[-1]:
                paragraphs.append({})
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t" and key:
            paragraphs[-1][key] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            paragraphs[-1][key] = value.strip()
    for para in paragraphs:
        if para.get("enabled", "yes").lower() == "no":
            continue
        yield (
            para.get("types", "").split(),
            para.get("uris", "").split(),
            para.get("suites", "").split(),
            para.get("components", "").split(),
        )


def apt_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = SUITE) -> str:
    """The Debian mirror apt uses on this machine for `suite` (main): the first http(s)
    URI of a `deb` entry, in apt's order of files; DEFAULT_MIRROR if there is none."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        entries = _deb822_sources(text) if path.suffix == ".sources" else _one_line_sources(text)
        for types, uris, suites, components in entries:
            if "deb" not in types or suite not in suites or "main" not in components:
                continue
            for uri in uris:
                if urlsplit(uri).scheme in ("http", "https"):
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


# --- the cached base -----------------------------------------------------------------


def cache_key(mirror: str) -> str:
    """SHA-256 of everything the base depends on, this module's source included."""
    inputs = {
        "suite": SUITE,
        "variant": VARIANT,
        "arch": platform.machine(),
        "packages": list(PACKAGES),
        "mirror": mirror,
        "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def base_tarball_path(cache_dir: Path, mirror: str) -> Path:
    return cache_dir / f"rootfs-{SUITE}-{cache_key(mirror)}.tar"


def _chroot(tree: Path, *argv: str, timeout: float = 600) -> run.Completed:
    return run.run(["chroot", str(tree), *argv], env=_GUEST_ENV, timeout=timeout)


def _debootstrap(root: Path, mirror: str, log_copy: Path) -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    env.update({k: v for k, v in os.environ.items() if k in _PROXY_ENV})
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(root),
        mirror,
    ]
    done = run.run(argv, env=env, check=False, timeout=3600)
    if done.returncode == 0:
        return
    where = ""
    with contextlib.suppress(OSError):
        shutil.copyfile(root / "debootstrap/debootstrap.log", log_copy)
        where = f"; its log is {log_copy}"
    lines = (done.stderr + done.stdout).decode(errors="replace").strip().splitlines()
    last = lines[-1].strip() if lines else "no error output"
    raise LocalError(f"debootstrap failed with exit code {done.returncode}: {last}{where}")


def _trim(root: Path) -> None:
    for rel in _TRIM_DIRS:
        shutil.rmtree(root / rel, ignore_errors=True)
    for rel in _TRIM_CONTENTS:
        directory = root / rel
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.name in ("partial", "lock"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for bin_cache in (root / "var/cache/apt").glob("*.bin"):
        bin_cache.unlink()
    doc = root / "usr/share/doc"
    if doc.is_dir():
        for path in sorted(doc.rglob("*"), reverse=True):
            if path.is_symlink() or (path.is_file() and path.name != "copyright"):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _check_private(directory: Path) -> None:
    """Refuse a cache another user could write: its base becomes every Core."""
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise LocalError(f"{directory}: the cache is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise LocalError(
            f"{directory}: the cache must belong to uid {os.geteuid()} and be writable by it alone"
        )


def ensure_base(cache_dir: Path, mirror: str) -> Path:
    """The base tarball for `mirror`, made by debootstrap if it is not in the cache."""
    cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    _check_private(cache_dir)
    key = cache_key(mirror)
    tarball = base_tarball_path(cache_dir, mirror)
    with files.locked(cache_dir / f".rootfs-{SUITE}.lock"):
        if tarball.is_file():
            log.info("testbed rootfs: base from the cache, %s", tarball.name)
            return tarball
        started = time.monotonic()
        log.info("testbed rootfs: debootstrap %s from %s (about a minute)", SUITE, mirror)
        work = Path(tempfile.mkdtemp(prefix=f"{_TMP}debootstrap-", dir=cache_dir))
        tmp_tar = cache_dir / f"{_TMP}{tarball.name}"
        try:
            root = work / "root"
            _debootstrap(root, mirror, cache_dir / f"debootstrap-{key[:16]}.log")
            _trim(root)
            _chroot(
                root,
                "python3",
                "-m",
                "compileall",
                "-q",
                "-f",
                "--invalidation-mode",
                "checked-hash",
                "/usr/lib/python3",
                f"/usr/lib/python3.{_guest_python_minor(root)}",
            )
            tmp_tar.unlink(missing_ok=True)
            run.run(
                ["tar", "--create", f"--file={tmp_tar}", f"--directory={root}", *_TAR_OPTIONS, "."],
                timeout=1800,
            )
            files.fsync_file(tmp_tar)
            os.replace(tmp_tar, tarball)
            files.fsync_dir(cache_dir)
        finally:
            tmp_tar.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        # Older bases (another mirror, an older version of this module) are stale.
        for stale in cache_dir.glob(f"rootfs-{SUITE}-*.tar"):
            if stale != tarball:
                stale.unlink(missing_ok=True)
        log.info("testbed rootfs: base cached in %.0f s", time.monotonic() - started)
        return tarball


def _guest_python_minor(root: Path) -> int:
    found = [
        int(m["minor"])
        for p in (root / "usr/lib").glob("python3.*")
        if (m := re.fullmatch(r"python3\.(?P<minor>\d+)", p.name)) and (p / "os.py").is_file()
    ]
    if len(found) != 1:
        raise LocalError(f"{root}: expected one Python 3 standard library, found {len(found)}")
    return found[0]


# --- the device ----------------------------------------------------------------------


def _inside(tree: Path, rel: str) -> Path:
    """tree/rel, its parent made, refusing a parent that resolves outside the tree."""
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.resolve().is_relative_to(tree.resolve()):
        raise LocalError(f"{path}: resolves outside the root tree")
    return path


def _write(tree: Path, rel: str, text: str, mode: int = 0o644) -> Path:
    path = _inside(tree, rel)
    if path.is_symlink():
        path.unlink()
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def _symlink(tree: Path, rel: str, target: str) -> None:
    path = _inside(tree, rel)
    if path.is_symlink() or path.is_file():
        path.unlink()
    path.symlink_to(target)


def _enable(tree: Path, wants: str, unit: str, template: str | None = None) -> None:
    """Enable `unit` as `systemctl enable` does: a symlink in /etc/systemd/system/<wants>."""
    unit_file = template or unit
    if not (tree / _UNIT_DIR / unit_file).is_file():
        raise LocalError(f"{tree}: no unit {unit_file} to enable")
    _symlink(tree, f"etc/systemd/system/{wants}/{unit}", f"/{_UNIT_DIR}/{unit_file}")


def os_release(os_name: str, version: Version) -> str:
    return (
        f'NAME="{os_name}"\n'
        f"ID={os_name}\n"
        "ID_LIKE=debian\n"
        f'VERSION="{version}"\n'
        f"VERSION_ID={version}\n"
        f'PRETTY_NAME="{os_name} {version} (Rampart testbed, Debian {SUITE})"\n'
        f"IMAGE_ID={os_name}\n"
        f"IMAGE_VERSION={version.core}\n"
    )


def config_toml(os_name: str, version: Version) -> str:
    return (
        f"# Rampart device configuration: the testbed's Core, version {version}.\n"
        f'os_name = "{os_name}"\n'
        "\n[core]\n"
        'backend = "lvm"\n'
        f'destination = "{VOLUME_GROUP}"\n'
        "\n[efiboot]\n"
        f'destination = "{ESP_DIRECTORY}"\n'
        f"boot_tries = {BOOT_TRIES}\n"
    )


# The device client's dependencies that Debian 12 does not ship (or ships too old):
# pure Python, copied from the interpreter that runs the build (pyproject.toml pins them).
DEVICE_LIBRARIES = ("tuf", "securesystemslib", "urllib3")


def library_dir(name: str) -> Path:
    """The package directory of `name` in this interpreter; LocalError if it is missing
    or not pure Python (a compiled module would not match the guest's Python)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LocalError(f"Python package {name} is not installed here: run `make setup`")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if any(directory.rglob("*.so")):
        raise LocalError(f"{directory}: {name} is not pure Python; cannot copy it into Core")
    return directory


def _install_rampart(tree: Path, package: Path) -> None:
    sources = [(package, "rampart")] + [(library_dir(n), n) for n in DEVICE_LIBRARIES]
    for source, name in sources:
        site = _inside(tree, f"usr/lib/python3/dist-packages/{name}")
        if site.exists():
            shutil.rmtree(site)
        shutil.copytree(
            source,
            site,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"),
        )
    _write(tree, "usr/bin/rampart", LAUNCHER, 0o755)
    _chroot(
        tree,
        "python3",
        "-m",
        "compileall",
        "-q",
        "--invalidation-mode",
        "checked-hash",
        *(f"/usr/lib/python3/dist-packages/{name}" for _, name in sources),
    )


# Units in rampart/data/systemd that belong to the update server, not to a device.
# The update server's units (rampart serve, the TUF timestamp's signing): not a device's.
SERVER_UNITS = frozenset(
    {"rampart-server.service", "rampart-tuf-timestamp.service", "rampart-tuf-timestamp.timer"}
)


def _configure_system_dir(
    tree: Path, os_name: str, version: Version, pubkey: Path | None, health_check: str
) -> None:
    _write(tree, "usr/lib/rampart/config.toml", config_toml(os_name, version))
    _write(tree, "usr/lib/rampart/health-check", health_check, 0o755)
    if pubkey is not None:
        shutil.copyfile(pubkey, _inside(tree, "usr/lib/rampart/pubkey"))
        (tree / "usr/lib/rampart/pubkey").chmod(0o644)


def _configure_units(tree: Path, data: Path) -> None:
    for unit in sorted((data / "systemd").iterdir()):
        if unit.name in SERVER_UNITS:
            continue
        _write(tree, f"{_UNIT_DIR}/{unit.name}", unit.read_text(encoding="utf-8"))
    for name, rel in TESTBED_UNITS.items():
        _write(tree, rel, testbed_unit(name))
    _write(tree, SYSTEM_CONF_PATH, SYSTEM_CONF)
    sysctl = (data / "hardening" / "sysctl.conf").read_text(encoding="utf-8")
    _write(tree, HARDENING_SYSCTL_PATH, sysctl)
    # procps (which openssh-server needs) ships 99-protect-links.conf, whose name sorts
    # after ours and set fs.protected_fifos back to 1: the release's audit caught it.
    # The hardening file sets all four of its keys; the vendor's is masked.
    _symlink(tree, "etc/sysctl.d/99-protect-links.conf", "/dev/null")
    _write(tree, "usr/libexec/rampart/commit-machine-id", COMMIT_MACHINE_ID, 0o755)
    for conf in sorted((data / "sysusers.d").iterdir()):
        _write(tree, f"usr/lib/sysusers.d/{conf.name}", conf.read_text(encoding="utf-8"))
        # /etc is read-only on the device: systemd-sysusers cannot add users at boot.
        _chroot(tree, "systemd-sysusers", f"/usr/lib/sysusers.d/{conf.name}")
    # The gateway's strongSwan user (what `rampart gateway render` puts in
    # etc/sysusers.d), made at build time like the others.
    _write(tree, f"usr/lib/sysusers.d/{GATEWAY_SYSUSERS[0]}", GATEWAY_SYSUSERS[1])
    _chroot(tree, "systemd-sysusers", f"/usr/lib/sysusers.d/{GATEWAY_SYSUSERS[0]}")
    _enable(tree, "timers.target.wants", "rampart-update.timer")
    _enable(tree, "multi-user.target.wants", "rampart-mark-good.service")
    _enable(tree, "multi-user.target.wants", "rampart-bootloader.service")
    _enable(tree, "boot-complete.target.requires", "rampart-health.service")
    for rel in _DISABLED:
        (tree / "etc/systemd/system" / rel).unlink(missing_ok=True)
    # Never on a device: the first-boot prompts, and the generator that would mount
    # the ESP on /boot by itself (fstab mounts it on /efi).
    _symlink(tree, "etc/systemd/system/systemd-firstboot.service", "/dev/null")
    for masked in MASKED:
        _symlink(tree, f"etc/systemd/system/{masked}", "/dev/null")
    _symlink(tree, "etc/systemd/system-generators/systemd-gpt-auto-generator", "/dev/null")
    no_shell = (data / "hardening" / "no-shell.conf").read_text(encoding="utf-8")
    for name in NO_SHELL_UNITS:
        _write(tree, f"{_UNIT_DIR}/{name}.d/{NO_SHELL_DROPIN}", no_shell)


def _configure_roles(tree: Path, data: Path) -> None:
    """sshd for the roles (keys only, on the state partition), sudo's rules, and no
    host key in the image: each machine makes its own at its first boot
    (rampart-ssh-hostkey.service)."""
    _write(tree, SSHD_CONF_PATH, (data / "roles" / "sshd.conf").read_text(encoding="utf-8"))
    _write(tree, SUDOERS_PATH, (data / "roles" / "sudoers").read_text(encoding="utf-8"), 0o440)
    for image_key in (tree / "etc/ssh").glob("ssh_host_*"):
        image_key.unlink()
    _enable(tree, "ssh.service.requires", "rampart-ssh-hostkey.service")
    _chroot(tree, "visudo", "--check", "--strict", "--file", f"/{SUDOERS_PATH}")
    # sshd -t with a throwaway host key (the real one is made at the first boot).
    scratch = Path(tempfile.mkdtemp(prefix="sshd-check-", dir=tree / "tmp"))
    try:
        key = f"/{scratch.relative_to(tree)}/host_key"
        _chroot(tree, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        _chroot(tree, "mkdir", "-p", "/run/sshd")
        _chroot(tree, "/usr/sbin/sshd", "-t", "-o", f"HostKey={key}")
    finally:
        shutil.rmtree(scratch)
        shutil.rmtree(tree / "run/sshd", ignore_errors=True)


def _configure_read_only_root(tree: Path) -> None:
    _write(tree, "etc/fstab", FSTAB)
    for mount_point in (STATE_MOUNT.lstrip("/"), ESP_MOUNT.lstrip("/")):
        _inside(tree, mount_point).mkdir(exist_ok=True)
    _symlink(tree, "etc/rampart", f"{STATE_MOUNT}/etc/rampart")
    _symlink(tree, "etc/machine-id", f"{STATE_MOUNT}/etc/machine-id")
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # LVM archives and backs up its metadata on every change: not into a read-only /etc.
    lvm_conf = tree / "etc/lvm/lvm.conf"
    text = lvm_conf.read_text(encoding="utf-8")
    for key, default in (("backup_dir", "backup"), ("archive_dir", "archive")):
        line = f'\t# {key} = "/etc/lvm/{default}"\n'
        if line not in text:
            raise LocalError(f"{lvm_conf}: no {key} line to set")
        text = text.replace(line, f'\t{key} = "/run/lvm/{default}"\n', 1)
    _write(tree, "etc/lvm/lvm.conf", text)
    _enable(tree, "local-fs.target.wants", "rampart-state-layout.service")
    _enable(tree, "sysinit.target.wants", "rampart-machine-id-commit.service")


def lock_accounts(shadow: str) -> str:
    """/etc/shadow's text with every account's password locked ("!"): nobody logs in
    with a password, root included. An account without a password hash ("*", "!")
    stays as it is, with "!" in front."""
    lines = []
    for line in shadow.splitlines():
        fields = line.split(":")
        if len(fields) < 2:
            raise LocalError(f"/etc/shadow: not an entry: {line!r}")
        if not fields[1].startswith("!"):
            fields[1] = "!" + ("" if fields[1] in ("", "*") else fields[1])
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def _configure_console(tree: Path) -> None:
    # The serial console keeps a getty: a person who types root there is refused.
    for tty in (SERIAL_TTY, PROBE_TTY):  # autologin.conf (TESTBED_UNITS): the probe's
        _enable(tree, "getty.target.wants", f"serial-getty@{tty}.service", "serial-getty@.service")
    shadow = (tree / "etc/shadow").read_text(encoding="utf-8")
    _write(tree, "etc/shadow", lock_accounts(shadow), 0o640)
    _write(tree, "root/.bashrc", BASHRC)
    _write(tree, "root/.inputrc", "set enable-bracketed-paste off\n")
    _write(tree, "root/.hushlogin", "")


def _configure_network(tree: Path) -> None:
    _write(tree, "etc/hostname", "rampart\n")
    _write(
        tree,
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\trampart\n::1\tlocalhost\n"
        f"{QEMU_USER_HOST}\t{UPDATE_HOST} {MIRROR_HOST}\n",
    )
    _write(tree, "etc/resolv.conf", f"nameserver {QEMU_USER_DNS}\n")
    _write(tree, "etc/systemd/network/80-rampart-dhcp.network", NETWORK)
    _enable(tree, "multi-user.target.wants", "systemd-networkd.service")
    _enable(tree, "sockets.target.wants", "systemd-networkd.socket")
    _enable(tree, "network-online.target.wants", "systemd-networkd-wait-online.service")


def configure(
    tree: Path,
    version: Version,
    checkout: Path,
    *,
    os_name: str = DEFAULT_OS_NAME,
    pubkey: Path | None = None,
    health_check: str = HEALTHY,
    kernel: initramfs.KernelModules | None = None,
) -> None:
    """Make the base tree `tree` a CLIP OS device running Rampart `version` from `checkout`;
    with `kernel`, Core carries its CORE_MODULES."""
    package = checkout / "src/rampart"
    _write(tree, "usr/lib/os-release", os_release(os_name, version))
    _symlink(tree, "etc/os-release", "../usr/lib/os-release")
    _install_rampart(tree, package)
    _configure_system_dir(tree, os_name, version, pubkey, health_check)
    _configure_units(tree, package / "data")
    _configure_roles(tree, package / "data")
    _configure_read_only_root(tree)
    _configure_console(tree)
    _configure_network(tree)
    if kernel is not None:
        initramfs.stage_modules(kernel, CORE_MODULES, tree)
        if kernel.config is not None:  # what `rampart hardening check` audits
            config = kernel.config.read_text(encoding="utf-8")
            _write(tree, f"boot/config-{kernel.release}", config)


def build_rootfs(
    version: Version | str,
    out_dir: Path,
    cache_dir: Path,
    checkout: Path,
    *,
    pubkey: Path | None = None,
    health_check: str = HEALTHY,
    os_name: str = DEFAULT_OS_NAME,
    mirror: str | None = None,
    kernel: initramfs.KernelModules | None = None,
) -> Path:
    """Build `<out_dir>/rootfs-<version>`, the root tree of Core `version`; return its path.

    `checkout` is the Rampart source tree to install (its src/rampart); `pubkey`, when
    given, becomes /usr/lib/rampart/pubkey; `health_check` is the text of
    /usr/lib/rampart/health-check (HEALTHY or FAILING); `mirror` defaults to the one
    apt uses here. An existing tree of that version is replaced, last.
    """
    if isinstance(version, str):
        version = parse_version(version)
    check_name(os_name, "OS name")
    if os.geteuid() != 0:
        raise LocalError("building the testbed's root tree needs root (debootstrap, chroot)")
    if not (checkout / "src/rampart/cli.py").is_file():
        raise UsageError(f"{checkout}: not a Rampart checkout (no src/rampart/cli.py)")
    if pubkey is not None and not pubkey.is_file():
        raise LocalError(f"{pubkey}: public key not found")
    if not health_check.startswith("#!"):
        raise UsageError("the health check must be a script starting with #!")
    mirror = mirror or apt_mirror()
    tarball = ensure_base(cache_dir, mirror)

    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"rootfs-{version}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}rootfs-{version}-", dir=out_dir))
    try:
        try:
            run.run(
                ["tar", "--extract", f"--file={tarball}", f"--directory={tmp}", *_TAR_OPTIONS],
                timeout=1800,
            )
        except LocalError as exc:
            raise LocalError(f"{tarball}: cannot unpack the cached base: {exc}") from exc
        tmp.chmod(0o755)
        configure(
            tmp,
            version,
            checkout,
            os_name=os_name,
            pubkey=pubkey,
            health_check=health_check,
            kernel=kernel,
        )
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP}old-", dir=out_dir))
            os.replace(final, old / "tree")
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("testbed rootfs: %s configured in %.1f s", final, time.monotonic() - started)
    return final
