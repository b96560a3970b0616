"""The device initramfs (`rampart build initramfs`).

Host tests read the archive back with an independent newc reader and check it
against the host's own tools: `ldd` for libraries, the ELF interpreter for the
loader, the modules' own .modinfo `depends=` and the kernel package's
depmod'ed modules.dep for dependencies, `busybox sh -n` for /init, `cpio` for
the archive format.

VM tests boot the Debian kernel directly (`-kernel/-initrd`, TCG, SeaBIOS) with
this initramfs and a virtio disk, every wait bounded:
- an empty disk: the console shows one `rampart: ...` line and the guest
  powers off by itself;
- a disk prepared by the guest itself: the host writes a GPT (`esp`, `lvm`)
  and seals a state key to PCR 23 of a swtpm; a separate setup initramfs (test
  only, built from the same parts) formats the ESP and copies the sealed key
  there, creates the PV, `mainvg`, `core_1.0.0` (the Core bundle written with
  dd) and `core_state` (LUKS2 with integrity, keyslot 0 the key, keyslot 1 a
  recovery passphrase, ext4 inside), and powers off; the real initramfs then
  boots the Core with that swtpm as the guest's TPM, unlocking the state with
  it, and the Core's /sbin/init reports that `/` is the dm-verity device,
  read-only, and /mnt/state is /dev/mapper/state, writable;
- the same disk without a TPM: one line says why and the recovery passphrase,
  typed on the serial console, unlocks the state; with another (empty) TPM
  and a wrong passphrase: two lines, and the guest powers off;
- the TPM's rollback counter raised above the command line's rampart.epoch:
  one line, and the guest powers off;
- the same disk with a wrong root hash, and with one flipped byte in Core: one
  line each, and the guest powers off;
- a command line naming core_state as the Core, with panic=1: one line, and
  the guest reboots (QEMU -no-reboot exits) instead of powering off.

The epoch check and the unlock logic are also tested on the host, with fake
commands and with swtpm: tests/release/test_initramfs_state.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart.contracts import cmdline, coremeta
from rampart.contracts.version import parse_version
from rampart.device import state as rstate
from rampart.device import tpm
from rampart.errors import RampartError, UsageError
from rampart.release import core, initramfs, uki
from rampart.release.cpio import Archive
from tests.conftest import start_swtpm
from tests.release import bootkit

VG = "mainvg"
VERSION = "1.0.0"
CORE = f"{VG}/core_{VERSION}"
CORE_MARKER = "RAMPART-CORE-INIT-5c1e"
SETUP_DONE = "RAMPART-SETUP-DONE-9b2d"
STATE_NOTE = "written by the setup guest"
BOOT_TIMEOUT = 120.0  # TCG boots in 10-20 s here; a stuck boot ends the test


# --- reading the archive back (independent of rampart.release.cpio) --------------------


@dataclass(frozen=True)
class Member:
    mode: int
    data: bytes
    uid: int
    gid: int
    mtime: int
    rdev: tuple[int, int]

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


def read_newc(raw: bytes) -> dict[str, Member]:
    """Path ("/init") -> member of a newc archive; asserts the format as it goes."""
    members: dict[str, Member] = {}
    pos = 0
    while True:
        assert raw[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(raw[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = raw[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = raw[data_start : data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
        assert name not in members, f"{name} twice"
        members["/" + name] = Member(
            fields[1], data, fields[2], fields[3], fields[5], (fields[9], fields[10])
        )
    assert not raw[pos:].strip(b"\0"), "data after the trailer"
    return members


def elf_interpreter(data: bytes) -> str:
    """PT_INTERP of a 64-bit little-endian ELF."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 0x20)[0],
        *struct.unpack_from("<HH", data, 0x36),
    )
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:
            return data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    raise AssertionError("no PT_INTERP")


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The .modinfo section of a kernel module (ELF64 LE): key -> values."""
    assert data[:4] == b"\x7fELF"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off : end] == b".modinfo":
            out: dict[str, list[str]] = {}
            for item in data[offset : offset + size].split(b"\0"):
                if b"=" in item:
                    key, _, value = item.decode(errors="replace").partition("=")
                    out.setdefault(key, []).append(value)
            return out
    raise AssertionError("no .modinfo section")


# --- fixtures ------------------------------------------------------------------------


def kernel_deb() -> Path:
    try:
        return initramfs.default_kernel_deb()
    except RampartError as exc:
        pytest.fail(f"no kernel package: {exc} (run make setup)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> initramfs.Initramfs:
    out = tmp_path_factory.mktemp("initramfs") / "initrd.img"
    start = time.monotonic()
    image = initramfs.build_initramfs(out, kernel_deb())
    print(f"\nbuild_initramfs: {time.monotonic() - start:.1f} s, {image.size} bytes")
    return image


@pytest.fixture(scope="module")
def members(built: initramfs.Initramfs) -> dict[str, Member]:
    return read_newc(gzip.decompress(built.path.read_bytes()))


@pytest.fixture(scope="module")
def kernel_modules(tmp_path_factory: pytest.TempPathFactory) -> initramfs.KernelModules:
    """The whole kernel package, unpacked and depmod'ed: the reference modules.dep."""
    return initramfs.unpack_kernel(kernel_deb(), tmp_path_factory.mktemp("kernel"))


def _moddir(built: initramfs.Initramfs) -> str:
    return f"/lib/modules/{built.kernel_release}"


# --- the archive ---------------------------------------------------------------------


def test_archive_holds_init_busybox_lvm_and_veritysetup(
    members: dict[str, Member], built: initramfs.Initramfs
) -> None:
    for path in ("/init", "/bin/busybox", "/sbin/lvm", "/sbin/veritysetup"):
        assert members[path].is_file, path
        assert members[path].mode & 0o111, f"{path} is not executable"
    assert members["/bin/busybox"].data == Path("/bin/busybox").read_bytes()
    for name, dest in initramfs.PROGRAMS.items():
        assert members[dest].data == initramfs.find_program(name).read_bytes()
    assert members["/init"].data.startswith(b"#!/bin/sh\n")
    console = members["/dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    assert b"udev_sync = 0" in members["/etc/lvm/lvm.conf"].data
    for directory in ("/proc", "/sys", "/dev", "/run", "/newroot"):
        assert stat.S_ISDIR(members[directory].mode), directory
    assert built.programs == (
        "/bin/busybox",
        "/sbin/lvm",
        "/sbin/veritysetup",
        "/sbin/cryptsetup",
        "/bin/tpm2",
    )


def test_archive_holds_cryptsetup_tpm2_tools_and_the_device_tcti(
    members: dict[str, Member], built: initramfs.Initramfs
) -> None:
    assert members["/sbin/cryptsetup"].data == Path("/usr/sbin/cryptsetup").read_bytes()
    assert members["/bin/tpm2"].data == Path("/usr/bin/tpm2").read_bytes()
    for tool in (
        "tpm2_load",
        "tpm2_startauthsession",
        "tpm2_policypcr",
        "tpm2_policyor",
        "tpm2_unseal",
        "tpm2_flushcontext",
        "tpm2_nvread",
        "tpm2_pcrread",
    ):
        member = members[f"/bin/{tool}"]
        assert member.is_link and member.data == b"/bin/tpm2", tool
        # Every tool /init runs is one of them, and the host's tpm2 is multi-call too.
        assert Path(f"/usr/bin/{tool}").resolve() == Path("/usr/bin/tpm2")
    init = members["/init"].data.decode()
    used = set(re.findall(r"\btpm2_[a-z]+", init))
    assert used <= set(initramfs.TPM2_TOOLS), used
    # The TCTI tss2-tctildr dlopen()s for device:/dev/tpmrm0, at its soname path
    # (the loader's default search path: there is no ld.so.cache), with its needs.
    tcti = "/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0"
    assert members[tcti].is_file
    assert members[tcti].data == Path(tcti).resolve().read_bytes()
    assert tcti in built.libraries
    for lib in _ldd(Path(tcti)):
        assert members[lib].data == Path(lib).read_bytes(), lib
        assert lib in built.libraries
    assert b"libtss2-tcti-device.so.0" in members["/lib/x86_64-linux-gnu/libtss2-tctildr.so.0"].data


def _unpack(members: dict[str, Member], root: Path) -> None:
    """The archive's files and links under `root` (device nodes left out)."""
    for name, member in sorted(members.items()):
        path = root / name.lstrip("/")
        if stat.S_ISDIR(member.mode):
            path.mkdir(parents=True, exist_ok=True)
        elif member.is_link:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(member.data.decode())
        elif member.is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(member.data)
            path.chmod(stat.S_IMODE(member.mode))


def test_archived_cryptsetup_derives_the_recovery_passphrase_key(
    members: dict[str, Member], tmp_path: Path
) -> None:
    """The recovery keyslot's argon2id runs in threads that call pthread_exit(), for
    which glibc dlopen()s libgcc_s.so.1: cryptsetup from the archive, run in a chroot
    of it, opens a keyslot made like the installer's (a header in a file: no
    device-mapper needed for --test-passphrase)."""
    root = tmp_path / "root"
    _unpack(members, root)
    for node, minor in (("null", 3), ("random", 8), ("urandom", 9)):  # /init mounts devtmpfs
        os.mknod(root / "dev" / node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    header = root / "state.img"
    with header.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    passphrase = rstate.new_recovery_passphrase()
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "65536",
            "--pbkdf-parallel",
            "2",
            "--pbkdf-force-iterations",
            "4",
            "--key-file=-",
            str(header),
        ],
        input=passphrase.encode(),
        check=True,
        capture_output=True,
    )
    for attempt, expected in ((passphrase, 0), ("not-" + passphrase, 2)):
        done = subprocess.run(
            [
                "chroot",
                str(root),
                "/sbin/cryptsetup",
                "open",
                "--test-passphrase",
                "--type",
                "luks2",
                "--key-file=-",
                "/state.img",
            ],
            input=attempt.encode(),
            capture_output=True,
            text=False,
        )
        assert done.returncode == expected, done.stderr.decode()


def test_missing_dlopened_library_says_run_make_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(initramfs, "LIBRARY_DIRS", ())
    with pytest.raises(RampartError, match=r"libtss2-nothing\.so\.0: .*run `make setup`"):
        initramfs.find_library("libtss2-nothing.so.0")


def test_busybox_applets_are_links_to_busybox(members: dict[str, Member]) -> None:
    listing = subprocess.run(
        ["/bin/busybox", "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    applets = [a for a in listing if "/" in a and a != "bin/busybox"]
    assert len(applets) > 200
    for applet in applets:
        member = members["/" + applet]
        assert member.is_link and member.data == b"/bin/busybox", applet
    for needed in (
        "/bin/sh",
        "/sbin/modprobe",
        "/sbin/switch_root",
        "/bin/mount",
        "/sbin/poweroff",
    ):
        assert members[needed].is_link, needed


def _ldd(program: Path) -> list[str]:
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            libs.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


@pytest.mark.parametrize("program", ["lvm", "veritysetup", "cryptsetup", "tpm2"])
def test_every_library_ldd_lists_is_in_the_archive(
    members: dict[str, Member], program: str
) -> None:
    binary = initramfs.find_program(program)
    libs = _ldd(binary)
    assert len(libs) > 5
    for lib in libs:
        assert members[lib].is_file, lib
        assert members[lib].data == Path(lib).read_bytes(), f"{lib} differs from the host's"


@pytest.mark.parametrize(
    "path", ["/sbin/lvm", "/sbin/veritysetup", "/sbin/cryptsetup", "/bin/tpm2"]
)
def test_dynamic_loader_is_there_at_the_programs_interpreter_path(
    members: dict[str, Member], path: str
) -> None:
    interpreter = elf_interpreter(members[path].data)
    assert interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert members[interpreter].is_file
    assert members[interpreter].data == Path(interpreter).read_bytes()


def test_modules_are_for_the_kernel_in_the_package(
    members: dict[str, Member], built: initramfs.Initramfs
) -> None:
    assert built.kernel_release == uki.bzimage_release(bootkit.kernel())
    moddir = _moddir(built)
    kos = [p for p in members if p.endswith(".ko")]
    assert kos and all(p.startswith(moddir + "/") for p in kos)
    for path in kos:
        vermagic = modinfo(members[path].data)["vermagic"][0]
        assert vermagic.split()[0] == built.kernel_release, path
    init = members["/init"].data.decode()
    assert f"KVER='{built.kernel_release}'" in init


def test_listed_modules_and_their_dependencies_are_in_the_archive(
    members: dict[str, Member],
    built: initramfs.Initramfs,
    kernel_modules: initramfs.KernelModules,
) -> None:
    moddir = _moddir(built)
    present = {p[len(moddir) + 1 :] for p in members if p.endswith(".ko")}
    names = {initramfs.module_name(p) for p in present}
    builtin = {
        initramfs.module_name(line)
        for line in members[f"{moddir}/modules.builtin"].data.decode().split()
    }
    wanted = [
        *("dm-mod", "dm-verity", "dm-bufio", "squashfs", "ext4", "jbd2", "mbcache", "crc16"),
        *("crc32c_generic", "virtio_blk", "virtio_pci", "virtio_scsi", "ahci", "sd_mod"),
        *("vfat", "fat", "nls_cp437", "nls_iso8859-1", "tpm_tis", "tpm_crb"),
        # LUKS2 with integrity: authenc(hmac(sha256),xts(aes)) on dm-crypt over dm-integrity
        *("dm-crypt", "dm-integrity", "async_xor", "xts", "ecb", "authenc"),
        *("hmac", "sha256_generic", "aes_generic", "aesni-intel", "algif_skcipher"),
    ]
    for name in wanted:
        norm = initramfs.module_name(name)
        assert norm in names or norm in builtin, f"{name} is neither in the archive nor built in"
    assert {"tpm_tis", "tpm_crb"} <= builtin  # Debian 12 builds the TPM drivers in
    assert {"hmac", "sha256_generic", "aes_generic"} <= builtin  # and these ciphers
    for name in ("dm-crypt", "dm-integrity", "xts", "ecb", "authenc"):
        assert initramfs.module_name(name) in names, f"{name} is not in the archive"
    # Against the kernel package's full modules.dep (depmod over every module):
    for name in (*initramfs.REQUIRED_MODULES, *initramfs.BEST_EFFORT_MODULES):
        path = kernel_modules.file_of(name)
        if path is None:
            continue
        for dep in kernel_modules.dep[path]:
            assert dep in present, f"{name} needs {dep} (modules.dep)"
    # Against each module's own .modinfo: every depends= entry is there.
    for rel in present:
        for depends in modinfo(members[f"{moddir}/{rel}"].data).get("depends", []):
            for dep in filter(None, depends.split(",")):
                assert initramfs.module_name(dep) in names, f"{rel} depends on {dep}"


def test_modules_dep_in_the_archive_names_exactly_its_modules(
    members: dict[str, Member], built: initramfs.Initramfs
) -> None:
    moddir = _moddir(built)
    dep = initramfs.parse_modules_dep(members[f"{moddir}/modules.dep"].data.decode())
    present = {p[len(moddir) + 1 :] for p in members if p.endswith(".ko")}
    assert set(dep) == present
    for path, needs in dep.items():
        assert set(needs) <= present, path
    assert set(built.modules) == present
    for index in ("modules.dep.bin", "modules.alias", "modules.symbols", "modules.builtin.bin"):
        assert f"{moddir}/{index}" in members, index


def test_init_loads_the_modules_it_carries_and_skips_builtins(
    members: dict[str, Member], built: initramfs.Initramfs
) -> None:
    init = members["/init"].data.decode()
    required = re.search(r"^REQUIRED_MODULES='([^']*)'$", init, re.M)
    best = re.search(r"^BEST_EFFORT_MODULES='([^']*)'$", init, re.M)
    assert required and best
    assert required.group(1).split() == list(initramfs.REQUIRED_MODULES)
    assert "tpm_tis" not in best.group(1).split()
    assert (*best.group(1).split(), *required.group(1).split()) == built.load_order


def test_busybox_sh_accepts_init(
    members: dict[str, Member], built: initramfs.Initramfs, tmp_path: Path
) -> None:
    installer = initramfs.init_script(
        built.kernel_release,
        initramfs.REQUIRED_MODULES,
        (*initramfs.BEST_EFFORT_MODULES, *initramfs.INSTALLER_MODULES),
        installer=True,
    )
    for name, text in (("init", members["/init"].data.decode()), ("installer", installer)):
        script = tmp_path / name
        script.write_text(text)
        done = subprocess.run(
            ["/bin/busybox", "sh", "-n", str(script)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "@" not in re.sub(r"dm-devel@|\$@|\"\$@\"", "", text), name


def test_init_reads_the_parameters_kernel_cmdline_writes(members: dict[str, Member]) -> None:
    init = members["/init"].data.decode()
    line = cmdline.kernel_cmdline(
        VG, VERSION, roothash="ab" * 32, hash_offset=4096, data_blocks=1, fec_offset=8192,
        fec_roots=2, epoch=3,
    )  # fmt: skip
    assert "rampart.epoch=3" in line
    for key in cmdline.cmdline_params(line):
        if key.startswith("rampart."):
            assert f"{key}=*)" in init, f"/init does not read {key}"
    assert "veritysetup open" in init and "switch_root" in init
    assert "\nopen_state\n" in init and "\ncheck_epoch\n" in init
    assert f'[ "$value" \\> {cmdline.MAX_EPOCH} ]' in init
    assert f"tpm2_nvread -C o -s 8 0x{tpm.COUNTER_INDEX:08x}" in init
    assert f"tpm2_load -Q -C 0x{tpm.PRIMARY_HANDLE:08x}" in init
    assert f"--key-slot {tpm.TPM_KEYSLOT} --key-file=-" in init
    assert f"--key-slot {tpm.RECOVERY_KEYSLOT} --key-file=-" in init
    assert f"SEALED={tpm.SEALED_DIR} " in init


def test_archive_is_reproducible_and_normalised(
    built: initramfs.Initramfs, members: dict[str, Member], tmp_path: Path
) -> None:
    code, out, err = bootkit.image_cli(
        "build", "initramfs", "--out", tmp_path / "again.img", "--kernel-deb", kernel_deb(),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert '"kernel_release"' in out
    again = (tmp_path / "again.img").read_bytes()
    assert again == built.path.read_bytes()
    assert hashlib.sha256(again).hexdigest() == built.sha256
    assert again[3] & 0x08 == 0, "gzip header carries a file name"
    assert again[4:8] == b"\0\0\0\0", "gzip header carries a timestamp"
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members.values())
    paths = list(members)
    assert paths == sorted(paths, key=lambda p: p.split("/"))


def test_cli_refuses_a_missing_kernel_package(tmp_path: Path) -> None:
    code, _, err = bootkit.image_cli(
        "build", "initramfs", "--out", tmp_path / "x.img", "--kernel-deb", tmp_path / "no.deb"
    )
    assert code == 3
    assert "kernel package not found" in err
    assert not (tmp_path / "x.img").exists()


# --- the cpio writer --------------------------------------------------------------


def test_cpio_extracts_with_gnu_cpio(tmp_path: Path) -> None:
    archive = Archive()
    archive.add_file("/a/b/c.txt", b"hello\n", 0o640)
    archive.add_symlink("/a/link", "b/c.txt")
    archive.add_file("/odd", b"x" * 5, 0o755)
    out = tmp_path / "a.cpio.gz"
    archive.write_gzip(out)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=gzip.decompress(out.read_bytes()),
        cwd=dest,
        check=True,
        capture_output=True,
    )
    assert (dest / "a/b/c.txt").read_bytes() == b"hello\n"
    assert stat.S_IMODE((dest / "a/b/c.txt").stat().st_mode) == 0o640
    assert (dest / "a/link").readlink() == Path("b/c.txt")
    assert (dest / "odd").read_bytes() == b"xxxxx"
    assert archive.paths() == ["/a", "/a/b", "/a/b/c.txt", "/a/link", "/odd"]


@pytest.mark.parametrize("path", ["/", "/a/../b", "/./x", "a", "/a//b", "/a/"])
def test_cpio_refuses_paths_that_are_not_plain(path: str) -> None:
    with pytest.raises(UsageError):
        Archive().add_file(path, b"")


def test_cpio_refuses_to_replace_a_different_file_silently() -> None:
    archive = Archive()
    archive.add_file("/f", b"one")
    archive.add_file("/f", b"one")  # the same content: fine
    with pytest.raises(UsageError):
        archive.add_file("/f", b"two")
    archive.add_file("/f", b"two", replace=True)
    with pytest.raises(UsageError):
        archive.add_file("/f/g", b"")


# --- booting it -------------------------------------------------------------------


@dataclass
class Boot:
    console: str
    seconds: float
    exited: bool  # QEMU stopped by itself: the guest powered off

    def lines(self, prefix: str) -> list[str]:
        text = self.console.replace("\r", "")
        return [line for line in text.splitlines() if line.startswith(prefix)]


def boot_direct(
    work: Path,
    initrd: Path,
    cmdline: str,
    disk: Path,
    timeout: float = BOOT_TIMEOUT,
    *,
    tpm_state: Path | None = None,
    answers: Sequence[tuple[str, str]] = (),
) -> Boot:
    """Boot the Debian kernel with `initrd` (TCG, no firmware), `disk` as virtio.

    With `tpm_state`, a swtpm with that state directory is the guest's TPM (TIS).
    `answers` are typed on the serial console in order, each once its text has
    appeared. Returns when the guest powers off or after `timeout` s; QEMU and
    swtpm are always killed before returning.
    """
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run make setup")
    stamp = time.monotonic_ns()
    log = work / f"console-{stamp}.log"
    log.write_bytes(b"")
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "512",
        "-display",
        "none",
        "-monitor",
        "none",
        "-chardev",
        f"stdio,id=ser0,signal=off,logfile={log}",
        "-serial",
        "chardev:ser0",
        "-net",
        "none",
        "-no-reboot",
        "-kernel",
        str(bootkit.kernel()),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-drive",
        f"if=virtio,format=raw,file={disk}",
    ]
    swtpm = None
    if tpm_state is not None:
        socket_path = work / f"swtpm-{stamp}.sock"
        swtpm = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={tpm_state}",
                "--ctrl",
                f"type=unixio,path={socket_path}",
                "--terminate",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if swtpm.poll() is not None or time.monotonic() > deadline:
                swtpm.kill()
                pytest.fail(f"swtpm did not start: {swtpm.communicate()[1]!r}")
            time.sleep(0.05)
        argv += [
            "-chardev",
            f"socket,id=chrtpm,path={socket_path}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    exited = False
    pending, searched = list(answers), 0
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                exited = True
                break
            if pending and proc.stdin is not None:
                text = log.read_text(errors="replace")
                at = text.find(pending[0][0], searched)
                if at >= 0:
                    proc.stdin.write(pending[0][1].encode())
                    proc.stdin.flush()
                    searched = at + len(pending.pop(0)[0])
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
        if swtpm is not None:
            swtpm.kill()
            swtpm.wait(10)
    console = log.read_text(errors="replace")
    if exited and proc.returncode != 0:
        raise AssertionError(f"qemu failed: {err.decode(errors='replace')[-2000:]}")
    return Boot(console, time.monotonic() - start, exited)


def _cmdline(
    roothash: str, hash_offset: int, data_blocks: int, *extra: str, epoch: int | None = None
) -> str:
    return cmdline.kernel_cmdline(
        VG,
        VERSION,
        roothash=roothash,
        hash_offset=hash_offset,
        data_blocks=data_blocks,
        extra=["console=ttyS0", *extra],
        lockdown=None,
        epoch=epoch,
    )


def _report(name: str, result: Boot) -> None:
    print(f"\n{name}: {result.seconds:.1f} s, powered off by itself: {result.exited}")


@pytest.mark.vm
def test_boot_without_the_volume_group_prints_one_line_and_powers_off(
    built: initramfs.Initramfs, tmp_path: Path
) -> None:
    disk = tmp_path / "empty.img"
    with disk.open("wb") as handle:
        handle.truncate(64 << 20)
    # rootdelay=2: how long /init waits for the volume group to appear.
    result = boot_direct(tmp_path, built.path, _cmdline("ab" * 32, 40960, 10, "rootdelay=2"), disk)
    _report("no volume group", result)
    assert result.exited, f"the guest did not power off:\n{result.console[-3000:]}"
    failures = result.lines("rampart:")
    assert failures == [
        f'rampart: cannot activate Core {CORE} with LVM: Volume group "{VG}" not found'
    ], result.console[-3000:]
    assert "reboot: Power down" in result.console
    assert "Kernel panic" not in result.console


@pytest.mark.vm
def test_bad_command_line_with_panic_reboots_after_one_line(
    built: initramfs.Initramfs, tmp_path: Path
) -> None:
    """panic=N turns the stop into `reboot -f` (QEMU's -no-reboot makes that an exit),
    so boot counting can fall back; the state LV is never accepted as a Core."""
    disk = tmp_path / "empty.img"
    with disk.open("wb") as handle:
        handle.truncate(16 << 20)
    cmdline = f"console=ttyS0 rampart.core={VG}/core_state panic=1"
    result = boot_direct(tmp_path, built.path, cmdline, disk)
    _report("bad command line, panic=1", result)
    assert result.exited, result.console[-3000:]
    assert result.lines("rampart:") == [
        f"rampart: rampart.core={VG}/core_state is not a Core LV"
    ], result.console[-3000:]
    assert "reboot: Restarting system" in result.console
    assert "Power down" not in result.console


# The Core's /sbin/init: report what / and /mnt/state are, then power off.
CORE_INIT = f"""#!/bin/sh
export PATH=/bin
root=$(awk '$5 == "/" {{print $3}}' /proc/self/mountinfo | tail -n 1)
echo "CORE-ROOT-DEV: $root"
echo "CORE-ROOT-DM: $(cat /sys/dev/block/$root/dm/name) $(cat /sys/dev/block/$root/dm/uuid)"
echo "CORE-ROOT-MOUNT: $(awk '$2 == "/" {{print $1, $3, $4}}' /proc/mounts | tail -n 1)"
writable=no
touch /written 2>/dev/null && writable=yes
echo "CORE-ROOT-WRITABLE: $writable"
echo "CORE-STATE-MOUNT: $(awk '$2 == "/mnt/state" {{print $1, $3, $4}}' /proc/mounts)"
echo "CORE-STATE-NOTE: $(cat /mnt/state/note)"
if echo ok > /mnt/state/from-core; then echo "CORE-STATE-WRITABLE: yes"; fi
echo "CORE-PID: $$"
echo {CORE_MARKER}
sync
poweroff -f
"""

SETUP_INIT = f"""#!/bin/sh
# Test only: make the disk the device initramfs expects, then power off. The
# host wrote the GPT (vda1 "esp", vda2 "lvm") and sealed /key to its swtpm.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mkdir -p /run/lvm /run/lock/lvm /run/cryptsetup /mnt
die() {{ echo "RAMPART-SETUP-FAILED: $*"; poweroff -f; sleep 60; }}
for m in virtio_pci virtio_blk $(cat /modules) vfat nls_cp437 nls_ascii; do
    modprobe "$m" || die "modprobe $m"
done
[ -b /dev/vda1 ] && [ -b /dev/vda2 ] || die "no /dev/vda1 and /dev/vda2"
mkdosfs -n ESP /dev/vda1 >/dev/null || die mkdosfs
mount -t vfat /dev/vda1 /mnt || die "mount ESP"
mkdir -p /mnt/{tpm.SEALED_DIR} && cp /sealed/* /mnt/{tpm.SEALED_DIR}/ || die "sealed key"
umount /mnt || die "umount ESP"
lvm pvcreate -y /dev/vda2 || die pvcreate
lvm vgcreate -y {VG} /dev/vda2 || die vgcreate
lvm lvcreate -y -W y -L @CORE_MIB@m -n core_{VERSION} {VG} || die "lvcreate core"
lvm lvcreate -y -W y -L 40m -n core_state {VG} || die "lvcreate state"
dd if=/core.img of=/dev/{VG}/core_{VERSION} bs=1M conv=fsync 2>/dev/null || die "dd core"
# As rampart.device.state.format_volume, with PBKDF2 for the passphrase too (TCG is slow).
state=/dev/{VG}/core_state
pbkdf="--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --hash sha256"
cryptsetup luksFormat --batch-mode --type luks2 --cipher {rstate.CIPHER} \\
    --key-size {rstate.KEY_BITS} --integrity {rstate.INTEGRITY} $pbkdf \\
    --key-slot {tpm.TPM_KEYSLOT} --key-file=/key $state || die luksFormat
cryptsetup luksAddKey --batch-mode $pbkdf --key-slot {tpm.RECOVERY_KEYSLOT} \\
    --key-file=/key $state /passphrase || die luksAddKey
cryptsetup open --type luks2 --key-file=/key $state state || die "cryptsetup open"
/sbin/mke2fs -q -F -t ext4 /dev/mapper/state || die mke2fs
mount -t ext4 /dev/mapper/state /mnt || die "mount state"
echo "{STATE_NOTE}" > /mnt/note
umount /mnt || die "umount state"
cryptsetup close state || die "cryptsetup close"
lvm vgchange -an {VG} || die vgchange
sync
echo {SETUP_DONE}
poweroff -f
"""

# GPT partition types: the ESP and Linux LVM.
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
LVM_TYPE = uuid.UUID("e6d6d379-f507-44c2-a23c-238f2a3df928")


def write_gpt(disk: Path, parts: Sequence[tuple[str, uuid.UUID, int, int]]) -> None:
    """A GPT (protective MBR, both headers) on the image `disk`, 512-byte sectors;
    `parts`: (name, type, first LBA, last LBA). The test has no sfdisk."""
    sectors = disk.stat().st_size // 512
    entries = bytearray(128 * 128)
    for index, (name, kind, first, last) in enumerate(parts):
        unique = uuid.uuid5(uuid.NAMESPACE_URL, f"rampart-test-partition-{index}")
        entry = kind.bytes_le + unique.bytes_le + struct.pack("<QQQ", first, last, 0)
        entries[index * 128 : (index + 1) * 128] = entry + name.encode("utf-16-le").ljust(72, b"\0")
    guid = uuid.uuid5(uuid.NAMESPACE_URL, "rampart-test-disk")

    def header(current: int, backup: int, table: int) -> bytes:
        fields = (
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            current,
            backup,
            34,
            sectors - 34,
            guid.bytes_le,
            table,
            128,
            128,
            zlib.crc32(entries),
        )
        raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
        raw = raw[:16] + struct.pack("<I", zlib.crc32(raw)) + raw[20:]
        return raw.ljust(512, b"\0")

    mbr = bytearray(512)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1, min(sectors - 1, 0xFFFFFFFF)
    )
    mbr[510:512] = b"\x55\xaa"
    with disk.open("r+b") as handle:
        handle.write(bytes(mbr) + header(1, sectors - 1, 2) + bytes(entries))
        handle.seek((sectors - 33) * 512)
        handle.write(bytes(entries) + header(sectors - 1, 1, sectors - 33))


@dataclass(frozen=True)
class Prepared:
    disk: Path
    tpm_state: Path  # the swtpm the state key is sealed to (PCR 23)
    meta: coremeta.CoreMeta
    bundle: bytes
    passphrase: str
    setup: Boot


SEALED_PCR = 23  # no firmware or kernel extends it: the same in every guest boot


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """A GPT disk: the ESP with the state key sealed to a swtpm, and mainvg with
    core_1.0.0 (a tiny Core) and core_state (LUKS2 with integrity, ext4 inside),
    made in a guest; the swtpm's state directory beside it."""
    work = tmp_path_factory.mktemp("prepared")
    tree = work / "rootfs"
    for directory in ("bin", "sbin", "dev", "proc", "sys", "run", "mnt/state", "tmp"):
        (tree / directory).mkdir(parents=True)
    shutil.copyfile("/bin/busybox", tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    for applet in ("sh", "cat", "echo", "awk", "touch", "tail", "poweroff", "sync"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "sbin/init").write_text(CORE_INIT)
    (tree / "sbin/init").chmod(0o755)
    meta = core.build_core(tree, parse_version(VERSION), work / "core")
    bundle = (work / "core" / f"core-{VERSION}.img").read_bytes()

    # The state key, sealed on the host to PCR 23 of the swtpm the guests get.
    key, passphrase = rstate.new_key(), rstate.new_recovery_passphrase()
    tpm_state, sealed = work / "tpm", work / "sealed"
    sealed.mkdir()
    for chip in start_swtpm(tpm_state):
        chip.seal(key, sealed / tpm.SEALED_PUB, sealed / tpm.SEALED_PRIV, (SEALED_PCR,))
    (sealed / tpm.SEALED_PCRS).write_text(tpm.pcr_selection((SEALED_PCR,)) + "\n")

    archive = Archive()
    initramfs.add_base(archive)
    initramfs.add_busybox(archive)
    for name in ("lvm", "cryptsetup"):
        initramfs.add_program(archive, initramfs.find_program(name), f"/sbin/{name}")
    # e2fsprogs' mke2fs replaces busybox's (ext2 only); /init calls it by path, as
    # Debian's busybox shell runs its own applets before searching PATH.
    initramfs.add_program(archive, initramfs.find_program("mke2fs"), "/sbin/mke2fs", replace=True)
    kernel = initramfs.unpack_kernel(kernel_deb(), work / "kernel")
    extra = ("virtio_pci", "virtio_blk", "vfat", "nls_cp437", "nls_ascii")
    initramfs.add_modules(archive, kernel, (*initramfs.REQUIRED_MODULES, *extra), work / "kernel")
    core_mib = -(-len(bundle) // (4 << 20)) * 4
    archive.add_file("/init", SETUP_INIT.replace("@CORE_MIB@", str(core_mib)).encode(), 0o755)
    archive.add_file("/modules", " ".join(initramfs.REQUIRED_MODULES).encode())
    archive.add_file("/core.img", bundle)
    archive.add_file("/key", key, 0o600)
    archive.add_file("/passphrase", passphrase.encode(), 0o600)
    for path in sorted(sealed.iterdir()):
        archive.add_copy(f"/sealed/{path.name}", path)
    setup_initrd = work / "setup.img"
    archive.write_gzip(setup_initrd)

    disk = work / "disk.img"
    with disk.open("wb") as handle:
        handle.truncate(128 << 20)
    esp_end = 2048 + (16 << 20) // 512
    write_gpt(
        disk,
        [("esp", ESP_TYPE, 2048, esp_end - 1), ("lvm", LVM_TYPE, esp_end, (128 << 20) // 512 - 34)],
    )
    setup = boot_direct(work, setup_initrd, "console=ttyS0 panic=-1", disk, timeout=300)
    _report("setup guest", setup)
    assert SETUP_DONE in setup.console, setup.console[-3000:]
    assert setup.exited
    return Prepared(disk, tpm_state, meta, bundle, passphrase, setup)


def _disk_copy(prepared: Prepared, work: Path) -> Path:
    disk = work / "disk.img"
    shutil.copyfile(prepared.disk, disk)
    return disk


def _tpm_copy(prepared: Prepared, work: Path) -> Path:
    """The swtpm state the state key is sealed to, for one boot."""
    return Path(shutil.copytree(prepared.tpm_state, work / "tpm"))


UNLOCKED_TPM = "rampart: state partition unlocked with the TPM"
UNLOCKED_PASSPHRASE = "rampart: state partition unlocked with the recovery passphrase"
ASK = f"; enter the recovery passphrase for {VG}/core_state"
PASSPHRASE_PROMPT = f"Enter passphrase for /dev/{VG}/core_state: "


@pytest.mark.vm
def test_boot_opens_core_with_dm_verity_and_switches_root(
    built: initramfs.Initramfs, prepared: Prepared, tmp_path: Path
) -> None:
    """With the TPM the key is sealed to: no prompt, the state is the LUKS2 volume."""
    meta = prepared.meta.verity
    disk = _disk_copy(prepared, tmp_path)
    result = boot_direct(
        tmp_path,
        built.path,
        _cmdline(meta.root_hash, meta.hash_offset, meta.data_blocks),
        disk,
        tpm_state=_tpm_copy(prepared, tmp_path),
    )
    _report("Core boot", result)
    console = result.console.replace("\r", "")
    assert CORE_MARKER in console, console[-4000:]
    assert result.exited
    assert result.lines("rampart:") == [
        UNLOCKED_TPM,
        f"rampart: booting Core {CORE} (dm-verity root hash {meta.root_hash})",
    ]
    assert "Enter passphrase" not in console
    dm = result.lines("CORE-ROOT-DM:")[0].split()
    assert dm[1] == f"verity_core_{VERSION}"
    assert dm[2].startswith("CRYPT-VERITY-")
    mount = result.lines("CORE-ROOT-MOUNT:")[0].split()
    assert mount[1:3] == [f"/dev/mapper/verity_core_{VERSION}", "squashfs"], mount
    assert mount[3].startswith("ro,"), mount
    assert result.lines("CORE-ROOT-WRITABLE:") == ["CORE-ROOT-WRITABLE: no"]
    state = result.lines("CORE-STATE-MOUNT:")[0].split()
    assert state[1:3] == ["/dev/mapper/state", "ext4"], state
    assert state[3].startswith("rw,") and {"nosuid", "nodev"} <= set(state[3].split(","))
    assert result.lines("CORE-STATE-NOTE:") == [f"CORE-STATE-NOTE: {STATE_NOTE}"]
    assert result.lines("CORE-STATE-WRITABLE:") == ["CORE-STATE-WRITABLE: yes"]
    assert result.lines("CORE-PID:") == ["CORE-PID: 1"]


@pytest.mark.vm
def test_boot_without_a_tpm_asks_for_the_recovery_passphrase(
    built: initramfs.Initramfs, prepared: Prepared, tmp_path: Path
) -> None:
    meta = prepared.meta.verity
    disk = _disk_copy(prepared, tmp_path)
    result = boot_direct(
        tmp_path,
        built.path,
        _cmdline(meta.root_hash, meta.hash_offset, meta.data_blocks),
        disk,
        answers=[(PASSPHRASE_PROMPT, prepared.passphrase + "\n")],
    )
    _report("no TPM, recovery passphrase", result)
    console = result.console.replace("\r", "")
    assert CORE_MARKER in console, console[-4000:]
    assert result.lines("rampart:") == [
        f"rampart: no TPM{ASK}",
        UNLOCKED_PASSPHRASE,
        f"rampart: booting Core {CORE} (dm-verity root hash {meta.root_hash})",
    ]
    assert prepared.passphrase not in console  # not echoed
    state = result.lines("CORE-STATE-MOUNT:")[0].split()
    assert state[1:3] == ["/dev/mapper/state", "ext4"], state
    assert result.lines("CORE-STATE-NOTE:") == [f"CORE-STATE-NOTE: {STATE_NOTE}"]


@pytest.mark.vm
def test_boot_with_another_tpm_and_a_wrong_passphrase_stops_with_one_line(
    built: initramfs.Initramfs, prepared: Prepared, tmp_path: Path
) -> None:
    meta = prepared.meta.verity
    disk = _disk_copy(prepared, tmp_path)
    other = tmp_path / "other-tpm"
    other.mkdir()
    result = boot_direct(
        tmp_path,
        built.path,
        _cmdline(meta.root_hash, meta.hash_offset, meta.data_blocks),
        disk,
        tpm_state=other,
        answers=[(PASSPHRASE_PROMPT, "not-the-passphrase\n")],
    )
    _report("another TPM, wrong passphrase", result)
    assert result.exited, result.console[-3000:]
    assert CORE_MARKER not in result.console
    assert result.lines("rampart:") == [
        f"rampart: the TPM cannot load the sealed state key (sealed by another TPM?){ASK}",
        f"rampart: the recovery passphrase does not open the state partition {VG}/core_state",
    ], result.console[-3000:]
    assert "reboot: Power down" in result.console


@pytest.mark.vm
def test_boot_of_an_epoch_below_the_tpm_counter_is_refused(
    built: initramfs.Initramfs, prepared: Prepared, tmp_path: Path
) -> None:
    meta = prepared.meta.verity
    disk = _disk_copy(prepared, tmp_path)
    tpm_state = _tpm_copy(prepared, tmp_path)
    for chip in start_swtpm(tpm_state):
        counter = chip.advance_counter(2)
    result = boot_direct(
        tmp_path,
        built.path,
        _cmdline(meta.root_hash, meta.hash_offset, meta.data_blocks, epoch=counter - 1),
        disk,
        tpm_state=tpm_state,
    )
    _report("epoch below the counter", result)
    assert result.exited, result.console[-3000:]
    assert CORE_MARKER not in result.console
    assert result.lines("rampart:") == [
        f"rampart: Core {CORE} has security epoch {counter - 1}, below the TPM's rollback "
        f"counter {counter}: refusing to boot an older version"
    ], result.console[-3000:]
    assert "reboot: Power down" in result.console


@pytest.mark.vm
def test_boot_with_a_wrong_root_hash_stops_at_verity(
    built: initramfs.Initramfs, prepared: Prepared, tmp_path: Path
) -> None:
    meta = prepared.meta.verity
    wrong = ("0" if meta.root_hash[0] != "0" else "1") + meta.root_hash[1:]
    disk = _disk_copy(prepared, tmp_path)
    result = boot_direct(
        tmp_path, built.path, _cmdline(wrong, meta.hash_offset, meta.data_blocks), disk
    )
    _report("wrong root hash", result)
    assert result.exited, result.console[-3000:]
    assert CORE_MARKER not in result.console
    lines = result.lines("rampart:")
    assert len(lines) == 1, result.console[-3000:]
    assert lines[0].startswith(f"rampart: cannot open Core {CORE} with dm-verity: "), lines


@pytest.mark.vm
def test_boot_with_one_flipped_byte_in_core_stops_with_one_line(
    built: initramfs.Initramfs, prepared: Prepared, tmp_path: Path
) -> None:
    meta = prepared.meta.verity
    disk = _disk_copy(prepared, tmp_path)
    image = bytearray(disk.read_bytes())
    at = image.find(prepared.bundle[:4096])
    assert at >= 0, "Core not found on the disk"
    # One bit in the inode table (which mount reads for the root inode), past
    # block 0 (which /init reads right after opening).
    inode_table = struct.unpack_from("<Q", prepared.bundle, 64)[0]
    assert inode_table >= 4096
    image[at + inode_table + 8] ^= 0x01
    disk.write_bytes(bytes(image))
    result = boot_direct(
        tmp_path, built.path, _cmdline(meta.root_hash, meta.hash_offset, meta.data_blocks), disk
    )
    _report("flipped byte", result)
    assert result.exited, result.console[-3000:]
    assert CORE_MARKER not in result.console
    lines = result.lines("rampart:")
    assert len(lines) == 1, result.console[-3000:]
    assert lines[0].startswith(f"rampart: cannot mount Core {CORE}"), lines
