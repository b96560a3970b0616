"""The testbed's root tree: debootstrap once per cache key, then configured per version
as a CLIP OS device, checked inside the tree with its own tools (chroot)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from rampart.contracts import roles
from rampart.contracts.version import parse_version
from rampart.device import config as device_config
from rampart.errors import LocalError
from rampart.release import initramfs
from rampart.testbed import rootfs
from tests.conftest import KeyPair, make_keypair
from tests.device.test_units import verify_units

CHECKOUT = Path(__file__).resolve().parents[2]
UNITS = "/usr/lib/systemd/system"
ENABLED = {
    "timers.target.wants/rampart-update.timer": "rampart-update.timer",
    "multi-user.target.wants/rampart-mark-good.service": "rampart-mark-good.service",
    "boot-complete.target.requires/rampart-health.service": "rampart-health.service",
    "getty.target.wants/serial-getty@ttyS0.service": "serial-getty@.service",
    "multi-user.target.wants/systemd-networkd.service": "systemd-networkd.service",
    "local-fs.target.wants/rampart-state-layout.service": "rampart-state-layout.service",
    "sysinit.target.wants/rampart-machine-id-commit.service": "rampart-machine-id-commit.service",
}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root")


def chroot(tree: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(tree), *argv],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
        timeout=300,
    )


FSTAB_GENERATOR = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")


def _microseconds(span: str) -> int:
    """A systemd time span in microseconds, as systemd itself parses it."""
    out = subprocess.run(
        ["systemd-analyze", "timespan", span], capture_output=True, text=True, check=True
    ).stdout
    return int(next(line for line in out.splitlines() if "μs:" in line).split()[-1])


def test_slow_boot_loses_the_serial_console_unless_devices_wait_for_slow_media() -> None:
    """The fault: on a host kept busy beside the tests, the guest's udev started 40 s
    after systemd, /dev/ttyS0's device job timed out at systemd's default 90 s and
    serial-getty@ttyS0 failed ("Dependency failed"): no console shell for the whole
    boot. Core's systemd configuration must give every device a wait sized for slow
    media, as the ESP's mount has (5 minutes)."""
    config = configparser.ConfigParser()
    config.read_string(rootfs.SYSTEM_CONF)
    timeout = config["Manager"]["DefaultDeviceTimeoutSec"]
    assert _microseconds(timeout) >= _microseconds("5min") > _microseconds("90s")
    assert rootfs.SYSTEM_CONF_PATH.startswith("usr/lib/systemd/system.conf.d/")
    assert rootfs.SYSTEM_CONF_PATH.endswith(".conf")


def test_slow_boot_loses_esp_unless_its_device_timeout_allows_slow_media(tmp_path: Path) -> None:
    """The fault: on a busy host the guest's udev made /dev/disk/by-partlabel/esp later
    than the fstab's 20 s device timeout, the ESP stayed unmounted for the whole boot,
    mark-good could not bless the entry and the boot ended `degraded`. systemd's own
    fstab generator, run on Core's fstab, must give the ESP's device a wait sized for
    slow media (5 minutes: far beyond the slowest boot seen, and systemd's 90 s
    default), keep the mount `nofail` (a boot without an ESP still comes up), and its
    mount unit must be one rampart-mark-good.service is ordered after."""
    fstab = tmp_path / "fstab"
    fstab.write_text(rootfs.FSTAB)
    out = tmp_path / "generated"
    out.mkdir()
    done = subprocess.run(
        [str(FSTAB_GENERATOR), str(out), str(out), str(out)],
        env={"SYSTEMD_FSTAB": str(fstab), "SYSTEMD_PROC_CMDLINE": "", "PATH": os.defpath},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    escape = ["systemd-escape", "--path"]
    device = subprocess.run(
        [*escape, "--suffix=device", f"/dev/disk/by-partlabel/{rootfs.ESP_PARTLABEL}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    mount = subprocess.run(
        [*escape, "--suffix=mount", rootfs.ESP_MOUNT], capture_output=True, text=True, check=True
    ).stdout.strip()
    dropin = (out / f"{device}.d/50-device-timeout.conf").read_text()
    (timeout,) = [
        line.partition("=")[2] for line in dropin.splitlines() if line.startswith("JobRunning")
    ]
    assert _microseconds(timeout) >= _microseconds("5min"), dropin
    assert (out / "local-fs.target.wants" / mount).exists()  # nofail: wanted, not required
    assert not (out / "local-fs.target.requires" / mount).exists()
    mark_good = (CHECKOUT / "src/rampart/data/systemd/rampart-mark-good.service").read_text()
    after = [
        unit
        for line in mark_good.splitlines()
        if line.startswith("After=")
        for unit in line.partition("=")[2].split()
    ]
    assert mount in after, after
    # The generated mount and the unit ordered after it pass systemd's checker together.
    units = tmp_path / "units"
    units.mkdir()
    shutil.copyfile(out / mount, units / mount)
    (units / "rampart-mark-good.service").write_text(
        mark_good.replace("/usr/bin/rampart", shutil.which("true") or "/bin/true")
    )
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(units / mount),
            str(units / "rampart-mark-good.service"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [
        line
        for line in done.stderr.splitlines()
        if ("rampart" in line or mount in line) and "Unit configured to use BPF" not in line
    ]
    assert done.returncode == 0 and not problems, done.stderr


def test_testbed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The testbed's own units (rampart/data/testbed), filled in, pass systemd's checker
    as they are installed: the probe's drop-in on serial-getty@hvc0.service.
    tests/device/test_units.py says what the check finds and what it cannot."""
    data = resources.files("rampart") / "data" / "testbed"
    assert sorted(entry.name for entry in data.iterdir()) == sorted(rootfs.TESTBED_UNITS)
    names = []
    for name, rel in rootfs.TESTBED_UNITS.items():
        text = rootfs.testbed_unit(name)
        assert not re.search(r"@[A-Z_]+@", text), name
        where = Path(rel)
        if where.parent.name.endswith(".d"):  # a drop-in: <unit>.d/<name> beside the units
            (tmp_path / where.parent.name).mkdir()
            (tmp_path / where.parent.name / name).write_text(text)
            names.append(where.parent.name.removesuffix(".d"))
        else:
            assert where.parent == Path("usr/lib/systemd/system"), rel
            (tmp_path / name).write_text(text)
            names.append(name)
    assert f"serial-getty@{rootfs.PROBE_TTY}.service" in names
    assert verify_units(tmp_path, names) == []
    state_layout = rootfs.testbed_unit("rampart-state-layout.service")
    assert f"RequiresMountsFor={rootfs.STATE_MOUNT}\n" in state_layout


def test_every_password_is_locked_and_hashes_are_kept() -> None:
    shadow = "root:*:19000:0:99999:7:::\nbin:!:1::::::\nops:$y$j9T$abc:1::::::\nnone::1::::::\n"
    assert rootfs.lock_accounts(shadow) == (
        "root:!:19000:0:99999:7:::\nbin:!:1::::::\nops:!$y$j9T$abc:1::::::\nnone:!:1::::::\n"
    )
    with pytest.raises(LocalError, match="not an entry"):
        rootfs.lock_accounts("root\n")


def test_a_broken_testbed_drop_in_is_found(tmp_path: Path) -> None:
    """The drop-in is checked, not merely present: a misspelt key in it is found."""
    getty = f"serial-getty@{rootfs.PROBE_TTY}.service"
    (tmp_path / f"{getty}.d").mkdir()
    text = rootfs.testbed_unit("autologin.conf").replace("ExecStart=-", "ExecStrat=-")
    (tmp_path / f"{getty}.d/autologin.conf").write_text(text)
    problems = verify_units(tmp_path, [getty])
    assert any("Unknown key 'ExecStrat'" in line for line in problems), problems


@dataclass(frozen=True)
class Built:
    out: Path
    first: Path  # 1.0.0, with a public key
    second: Path  # 1.0.1, from the cached base
    tarball: Path
    cache_stat: os.stat_result  # the tarball after the first build
    key: KeyPair


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # The machine-wide cache, as `rampart testbed build` uses it: a rerun is warm.
    cache = initramfs.default_cache_dir()
    work = tmp_path_factory.mktemp("rootfs")
    key = make_keypair(work / "keys")
    out = work / "out"
    first = rootfs.build_rootfs("1.0.0", out, cache, CHECKOUT, pubkey=key.public)
    tarball = rootfs.base_tarball_path(cache, rootfs.apt_mirror())
    cache_stat = tarball.stat()
    second = rootfs.build_rootfs(parse_version("1.0.1"), out, cache, CHECKOUT)
    return Built(out, first, second, tarball, cache_stat, key)


# --- host-only: the mirror and the cache key ------------------------------------------


def test_mirror_is_the_one_apt_uses_for_the_suite(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://source.example/debian bookworm main\n"
        "deb [arch=amd64] http://other-suite.example/debian trixie main\n"
    )
    (apt / "sources.list.d/10-off.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\n"
        "Components: main\nEnabled: no\n"
    )
    (apt / "sources.list.d/20-debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.example/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    (apt / "sources.list.d/30-later.list").write_text(
        "deb [signed-by=/k.gpg] https://later.example/debian bookworm main\n"
    )
    assert rootfs.apt_mirror(apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text(
        "deb [ arch=amd64 signed-by=/k.gpg ] http://first.example/debian bookworm main contrib\n"
    )
    assert rootfs.apt_mirror(apt) == "http://first.example/debian"
    assert rootfs.apt_mirror(tmp_path / "nothing") == rootfs.DEFAULT_MIRROR


def test_cache_key_follows_the_inputs() -> None:
    key = rootfs.cache_key("http://a.example/debian")
    assert key == rootfs.cache_key("http://a.example/debian")
    assert key != rootfs.cache_key("http://b.example/debian")
    assert len(key) == 64 and int(key, 16) >= 0


def test_a_cache_others_can_write_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(LocalError, match="writable by it alone"):
        rootfs.ensure_base(cache, "http://unused.example/debian")
    assert sorted(p.name for p in cache.iterdir()) == []


# --- the real build (debootstrap, chroot) ---------------------------------------------


@pytest.mark.vm
@needs_root
def test_os_release_names_the_version(built: Built) -> None:
    release = built.first / "etc/os-release"
    assert str(release.readlink()) == "../usr/lib/os-release"
    text = release.read_text()
    for line in ("VERSION_ID=1.0.0", "IMAGE_VERSION=1.0.0", "ID=clipos", 'NAME="clipos"'):
        assert line in text.splitlines()
    assert "PRETTY_NAME=" in text
    assert device_config.read_os_release_version(release) == parse_version("1.0.0")
    assert device_config.read_os_release_version(built.second / "etc/os-release") == (
        parse_version("1.0.1")
    )


@pytest.mark.vm
@needs_root
def test_the_guest_python_runs_rampart_from_the_checkout(built: Built) -> None:
    site = built.first / "usr/lib/python3/dist-packages/rampart"
    assert (site / "cli.py").read_bytes() == (CHECKOUT / "src/rampart/cli.py").read_bytes()
    assert not (built.first / "usr/local/lib").exists() or not any(
        (built.first / "usr/local/lib").rglob("rampart*")
    )
    done = chroot(built.first, "python3", "-c", "import rampart.cli, cryptography")
    assert done.returncode == 0, done.stderr
    launcher = built.first / "usr/bin/rampart"
    assert launcher.read_text().startswith("#!/usr/bin/python3\n")
    assert os.access(launcher, os.X_OK)
    done = chroot(built.first, "rampart", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("rampart ")


@pytest.mark.vm
@needs_root
def test_the_device_configuration_loads_in_the_guest(built: Built) -> None:
    assert (built.first / "usr/lib/rampart/pubkey").read_bytes() == built.key.public.read_bytes()
    assert not (built.second / "usr/lib/rampart/pubkey").exists()
    script = (
        "from pathlib import Path\n"
        "from rampart.device.config import load_device_config\n"
        "c = load_device_config(Path('/usr/lib/rampart'))\n"
        "print(c.os_name, c.backend, c.core_destination, c.esp_directory, c.boot_tries)\n"
    )
    done = chroot(built.first, "python3", "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "clipos",
        "lvm",
        "mainvg",
        "/efi/EFI/Linux",
        str(rootfs.BOOT_TRIES),
    ]


@pytest.mark.vm
@needs_root
def test_units_are_installed_and_enabled(built: Built) -> None:
    tree = built.first
    for name in ("rampart-update.service", "rampart-update.timer", "rampart-mark-good.service"):
        shipped = CHECKOUT / "src/rampart/data/systemd" / name
        assert (tree / UNITS.lstrip("/") / name).read_bytes() == shipped.read_bytes()
    # The update server's unit is shipped in the same package but not on a device.
    assert not (tree / UNITS.lstrip("/") / "rampart-server.service").exists()
    sysusers = CHECKOUT / "src/rampart/data/sysusers.d/rampart.conf"
    assert (tree / "usr/lib/sysusers.d/rampart.conf").read_bytes() == sysusers.read_bytes()
    # /etc is read-only on the device: the user exists in the image already.
    assert any(line.startswith("rampart-fetch:") for line in (tree / "etc/passwd").open())
    for link, unit in ENABLED.items():
        path = tree / "etc/systemd/system" / link
        assert str(path.readlink()) == f"{UNITS}/{unit}", link
        assert (tree / UNITS.lstrip("/") / unit).is_file()
    done = chroot(
        tree,
        "systemctl",
        "is-enabled",
        "rampart-update.timer",
        "rampart-mark-good.service",
        "rampart-health.service",
        "serial-getty@ttyS0.service",
    )
    assert done.returncode == 0 and done.stdout.split() == ["enabled"] * 4, done
    health = (tree / UNITS.lstrip("/") / "rampart-health.service").read_text()
    for line in (
        "Before=boot-complete.target",
        "RequiredBy=boot-complete.target",
        "ExecStart=/usr/lib/rampart/health-check",
    ):
        assert line in health.splitlines()
    done = chroot(
        tree,
        "systemd-analyze",
        "verify",
        "--man=no",
        *(f"{UNITS}/{u}" for u in ("rampart-health.service", "rampart-update.timer")),
        f"{UNITS}/rampart-mark-good.service",
        f"{UNITS}/rampart-state-layout.service",
        f"{UNITS}/rampart-machine-id-commit.service",
    )
    assert done.returncode == 0, done.stderr
    assert not (tree / "etc/systemd/system/timers.target.wants/apt-daily.timer").exists()


@pytest.mark.vm
@needs_root
def test_state_symlinks_console_and_read_only_root(built: Built) -> None:
    tree = built.first
    assert str((tree / "etc/rampart").readlink()) == "/mnt/state/etc/rampart"
    assert str((tree / "etc/machine-id").readlink()) == "/mnt/state/etc/machine-id"
    # systemd's own commit of the first boot's machine ID needs a writable /etc.
    assert os.access(tree / "usr/libexec/rampart/commit-machine-id", os.X_OK)
    assert (tree / "mnt/state").is_dir() and (tree / "efi").is_dir()
    fstab = (tree / "etc/fstab").read_text()
    assert "/mnt/state/var  /var  none  bind" in fstab and "tmpfs  /tmp" in fstab
    # No interactive root: root's shell only on the testbed's probe, every password
    # locked; the serial console has a plain getty.
    units = tree / "etc/systemd/system"
    dropin = units / "serial-getty@hvc0.service.d/autologin.conf"
    assert "--autologin root" in dropin.read_text()
    assert not (units / "serial-getty@ttyS0.service.d").exists()
    wants = sorted(path.name for path in (units / "getty.target.wants").iterdir())
    assert wants == ["serial-getty@hvc0.service", "serial-getty@ttyS0.service"], wants
    for line in (tree / "etc/shadow").read_text().splitlines():
        assert line.split(":")[1].startswith("!"), line
    assert f"PS1='{rootfs.PROMPT}'" in (tree / "root/.bashrc").read_text()
    done = chroot(tree, "bash", "-ic", 'printf "%s" "$PS1"')
    assert done.stdout.endswith(rootfs.PROMPT), done
    assert str((tree / "etc/systemd/system/systemd-firstboot.service").readlink()) == "/dev/null"
    assert 'backup_dir = "/run/lvm/backup"' in (tree / "etc/lvm/lvm.conf").read_text()
    done = chroot(tree, "systemd-analyze", "cat-config", "systemd/system.conf")
    assert f"DefaultDeviceTimeoutSec={rootfs.DEVICE_TIMEOUT}" in done.stdout.splitlines(), done


URL = "https://mirror.rampart.test:47443"
SUDO_VERDICTS = [
    (
        "admin",
        f"/usr/bin/rampart remote set --update-url {URL}/update/v1 --dist-url {URL}/dist",
        True,
    ),
    ("admin", "/usr/bin/rampart remote set --channel beta --json", True),
    ("admin", "/usr/bin/rampart remote set --root-ca -", True),
    ("admin", "/usr/bin/rampart remote set -r /tmp --channel beta", False),
    ("admin", "/usr/bin/rampart remote set --channel beta -r /tmp", False),
    ("admin", "/usr/bin/rampart remote set --update-url=https://x.test/u", False),
    ("admin", "/usr/bin/rampart remote set", False),
    ("admin", "/usr/bin/rampart boot-once 1.0.0", True),
    ("admin", "/usr/bin/rampart boot-once -c /tmp 1.0.0", False),
    ("admin", "/usr/bin/rampart boot-once 1.0.0 -c /tmp", False),
    ("admin", "/usr/bin/systemctl start rampart-update.service", True),
    ("admin", "/usr/bin/systemctl start rampart-update.service --no-block", False),
    ("admin", "/usr/bin/rampart tpm reseal", True),
    ("admin", "/usr/bin/systemctl reboot", True),
    ("admin", "/usr/bin/rampart status --json", True),
    ("admin", "/bin/bash", False),
    ("audit", "/usr/bin/rampart status --json", True),
    ("audit", "/usr/bin/rampart tpm status", True),
    ("audit", "/usr/bin/rampart remote show --json", True),
    ("audit", "/usr/bin/systemctl start rampart-update.service", False),
    ("audit", "/usr/bin/rampart remote set --channel beta", False),
    ("audit", "/usr/bin/journalctl --rotate", False),
    ("audit", "/usr/bin/systemctl reboot", False),
    ("audit", "/usr/sbin/swanctl --list-sas", True),
    ("audit", "/usr/sbin/swanctl --list-conns", True),
    ("audit", "/usr/sbin/nft list ruleset", True),
    ("audit", "/usr/sbin/swanctl --load-all", False),
    ("audit", "/usr/sbin/swanctl --terminate --ike gw-b", False),
    ("audit", "/usr/sbin/nft flush ruleset", False),
    ("audit", "/usr/sbin/nft -f /tmp/rules", False),
]


@pytest.mark.vm
@needs_root
def test_the_roles_log_in_over_ssh_with_keys_and_act_through_sudo(built: Built) -> None:
    """The admin and audit roles as the tree has them (the build ran sshd -t and
    visudo --check on them; scenario 3 logs in): no host key in the image, each
    machine makes its own; the roles' passwords locked like every other."""
    tree = built.first
    assert not list((tree / "etc/ssh").glob("ssh_host_*"))
    sshd = (tree / rootfs.SSHD_CONF_PATH).read_text()
    assert "AllowUsers admin audit\n" in sshd and "PermitRootLogin no\n" in sshd
    assert f"HostKey {roles.HOST_KEY_PATH}\n" in sshd
    assert f"AuthorizedKeysFile {roles.AUTHORIZED_KEYS_PATH}/%u\n" in sshd
    sudoers = tree / rootfs.SUDOERS_PATH
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    requires = tree / "etc/systemd/system/ssh.service.requires/rampart-ssh-hostkey.service"
    assert requires.is_symlink()
    passwd = {line.split(":")[0]: line for line in (tree / "etc/passwd").read_text().splitlines()}
    for role in roles.ROLES:
        assert passwd[role].endswith(":/:/bin/bash"), passwd[role]
    shadow = {line.split(":")[0]: line for line in (tree / "etc/shadow").read_text().splitlines()}
    assert all(shadow[role].split(":")[1].startswith("!") for role in roles.ROLES)
    group = (tree / "etc/group").read_text()
    assert re.search(r"^systemd-journal:x:\d+:audit$", group, re.MULTILINE), group
    # The real sudo's verdicts on the rules (`sudo -U ROLE -l COMMAND`).
    for role, command, allowed in SUDO_VERDICTS:
        done = chroot(tree, "sudo", "-U", role, "-l", *command.split())
        assert (done.returncode == 0) is allowed, (role, command, done)


@pytest.mark.vm
@needs_root
def test_a_refused_sudo_command_is_logged(built: Built) -> None:
    """A command no rule allows is refused at once and logged ("command not allowed",
    with the role and the command). It used not to be logged: sudo asked a role for
    its password (locked) before it refused, and `sudo -n` ended there with "a
    password is required", which sudo does not log (scenario 3 found it). The roles'
    Defaults now say !authenticate: their SSH key is their authentication."""
    tree = built.first
    where = tree / "dev/log"  # syslog(3), as journald's socket is in the guest
    where.unlink(missing_ok=True)
    lines: list[str] = []
    done_sending = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(where))
        where.chmod(0o666)
        syslog.settimeout(0.5)

        def read() -> None:
            # Read while they send: a datagram socket queues 10 messages
            # (net.unix.max_dgram_qlen), then su and sudo wait (they log 20 and more
            # here, PAM's among them), and the chroot hung.
            while True:
                try:
                    lines.append(syslog.recv(4096).decode(errors="replace"))
                except TimeoutError:
                    if done_sending.is_set():
                        return

        reader = threading.Thread(target=read)
        reader.start()
        try:
            command = "sudo -n /usr/bin/systemctl start rampart-update.service"
            done = chroot(tree, "su", "-s", "/bin/sh", "audit", "-c", command)
        finally:
            done_sending.set()
            reader.join()
            where.unlink()
    assert done.returncode != 0 and "not allowed" in done.stderr, done
    refused = "audit : command not allowed ; PWD=/ ; USER=root ; COMMAND=/usr/bin/systemctl start"
    assert any(refused in line for line in lines), lines


@pytest.mark.vm
@needs_root
def test_the_health_check_passes_by_default(built: Built) -> None:
    assert chroot(built.first, "/usr/lib/rampart/health-check").returncode == 0


@pytest.mark.vm
@needs_root
def test_the_second_version_reuses_the_cached_base(built: Built) -> None:
    after = built.tarball.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        built.cache_stat.st_ino,
        built.cache_stat.st_mtime_ns,
        built.cache_stat.st_size,
    )
    assert built.first != built.second and built.second.name == "rootfs-1.0.1"
    # One base per key: nothing else accumulates in the cache.
    bases = sorted(built.tarball.parent.glob(f"rootfs-{rootfs.SUITE}-*.tar"))
    assert bases == [built.tarball]
    assert sorted(p.name for p in built.out.iterdir()) == ["rootfs-1.0.0", "rootfs-1.0.1"]


@pytest.mark.vm
@needs_root
def test_a_rebuild_replaces_the_tree_and_can_fail_its_health_check(built: Built) -> None:
    tree = rootfs.build_rootfs(
        "1.0.1", built.out, initramfs.default_cache_dir(), CHECKOUT, health_check=rootfs.FAILING
    )
    assert tree == built.second
    done = chroot(tree, "/usr/lib/rampart/health-check")
    assert done.returncode != 0 and "broken on purpose" in done.stderr
    assert built.tarball.stat().st_mtime_ns == built.cache_stat.st_mtime_ns
    assert sorted(p.name for p in built.out.iterdir()) == ["rootfs-1.0.0", "rootfs-1.0.1"]


@pytest.mark.vm
@needs_root
def test_a_failed_build_leaves_nothing_and_keeps_the_old_tree(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (built.first / "usr/lib/os-release").read_text()

    def broken(tree: Path) -> None:
        raise LocalError("injected failure")

    monkeypatch.setattr(rootfs, "_configure_network", broken)
    with pytest.raises(LocalError, match="injected failure"):
        rootfs.build_rootfs("1.0.0", built.out, initramfs.default_cache_dir(), CHECKOUT)
    assert sorted(p.name for p in built.out.iterdir()) == ["rootfs-1.0.0", "rootfs-1.0.1"]
    assert (built.first / "usr/lib/os-release").read_text() == before
