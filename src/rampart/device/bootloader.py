"""Boot loader updates (docs/client.md "Boot loader updates").

A release may carry systemd-boot (`<os>-bootloader.efi`: signed for Secure Boot with
the db key, and like the release's other documents with minisign or as a TUF
target). The update fetches and verifies it with the release and stages it on the
state partition (`stage`); nothing on the ESP changes then. Once that release has
booted and been marked good, `rampart bootloader install`
(rampart-bootloader.service, after rampart-mark-good.service) installs it
(`install`):

1. **Checks**: the running version's boot entry is blessed (marked good); the staged
   file is systemd-boot; its Secure Boot signature verifies with a certificate of the
   firmware's db (`sbverify`, one certificate at a time), and dbx holds neither its
   image hash (Authenticode SHA-256) nor a certificate of its signature. What the
   firmware would refuse is never written.
2. **The main copy**, `EFI/systemd/systemd-bootx64.efi`: written as `<name>.new`,
   fsynced and read back; the old copy removed; `.new` renamed; read back again.
   After each change the whole ESP is written back (`syncfs`): on FAT, fsync of a
   directory did not make a rename durable.
3. **The boot option**: unless a `Boot####` variable names the main copy, `efibootmgr`
   adds one, first in `BootOrder`.
4. **The fallback copy**, `EFI/BOOT/BOOTX64.EFI` (the removable-media path the
   firmware starts without a boot option, or when the one it tried fails), the same way.

The ESP is FAT, which promises no atomic rename: the order is what keeps the machine
bootable. While the main copy is written, removed or renamed (2), the fallback copy is
whole and verified, and the firmware falls back to it when the boot option's file is
missing or fails its signature check; while the fallback copy changes (4), the main
copy is whole, verified and named by the boot option (3). A crash anywhere leaves
the staged file: the next `install` starts again from 1. Without a boot option for
the main copy (no `efibootmgr`, no efivarfs), the fallback copy is not touched: it
would be the only copy.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rampart import run
from rampart.contracts import bootloader, efivars, wire
from rampart.contracts.layout import FALLBACK_LOADER_PATH, LOADER_PATH, efi_file_path
from rampart.contracts.version import Version
from rampart.device import firmware
from rampart.device.documents import Trust, signed_document
from rampart.device.esp import Esp
from rampart.device.fetch import Fetcher
from rampart.errors import ConflictError, FormatError, LocalError, VerificationError
from rampart.files import replace_whole, syncfs, write_all

log = logging.getLogger(__name__)

BOOT_OPTION_LABEL = "Rampart (systemd-boot)"
Checkpoint = Callable[[str], None]


def staged_path(directory: Path, version: Version) -> Path:
    return directory / f"{version.core}.efi"


def stage(
    fetcher: Fetcher,
    trust: Trust,
    dist_url: str,
    os_name: str,
    version: Version,
    directory: Path,
) -> str | None:
    """Fetch and verify the boot loader release `version` carries and keep it in
    `directory` (mode 0600, whole or not at all), for `install` after its good boot;
    its LoaderInfo, or None if the release carries none. Staged loaders of other
    versions are removed. VerificationError or FormatError if it is not what was
    signed, or not a systemd-boot."""
    name = wire.loader_name(os_name)
    data = signed_document(fetcher, trust, dist_url, version, name, wire.LOADER_MAX)
    _remove_staged(directory, keep=None)
    if data is None:
        return None
    info = bootloader.loader_info(data, name)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_whole(staged_path(directory, version), data, mode=0o600)
    except OSError as exc:
        raise LocalError(f"{directory}: cannot stage the boot loader: {exc.strerror}") from None
    log.info("%s carries %s: staged, installed once it booted and was marked good", version, info)
    return info


def _remove_staged(directory: Path, keep: Path | None) -> None:
    if not directory.is_dir():
        return
    for path in directory.glob("*.efi*"):
        if path != keep:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Installed:
    version: str  # the LoaderInfo installed
    boot_option: bool  # a boot option names the main copy (else the fallback copy unchanged)
    copies: list[str]  # the copies written, below the ESP's root


def install(
    esp: Esp,
    directory: Path,
    running: Version,
    efivars_dir: Path,
    checkpoint: Checkpoint | None = None,
    halt_at: str | None = None,
) -> Installed | None:
    """Install the boot loader staged for the running version (see the module's
    docstring); None if none is staged or it is installed already. ConflictError
    before the running version is marked good; VerificationError if the firmware
    would refuse it (nothing written)."""
    staged = staged_path(directory, running)
    if not staged.is_file():
        _remove_staged(directory, keep=None)
        return None
    entry = esp.find(running)
    if entry is None or entry.counted:
        raise ConflictError(
            f"{running.core}: not marked good yet; its boot loader is installed after its "
            "good boot (rampart mark-good)"
        )
    data = staged.read_bytes()
    info = bootloader.loader_info(data, str(staged))
    root = esp.directory.parent.parent  # EFI/Linux -> the ESP's root
    main, fallback = root / LOADER_PATH, root / FALLBACK_LOADER_PATH
    if _holds(main, data) and _holds(fallback, data):
        log.info("%s is installed already", info)
        staged.unlink()
        return None
    check_secure_boot(staged, data, efivars_dir)

    def step(name: str) -> None:
        if checkpoint is not None:
            checkpoint(name)
        if name == halt_at:
            log.warning("halted at %s (--halt-at): waiting to be powered off", name)
            while True:
                signal.pause()

    step("checked")
    copies = [LOADER_PATH]
    _replace(main, data, "main", step)
    option = _ensure_boot_option(root, efivars_dir)
    step("boot-option")
    if option:
        _replace(fallback, data, "fallback", step)
        copies.append(FALLBACK_LOADER_PATH)
    else:
        log.warning(
            "no boot option names %s: %s left as it is (it would be the only copy)",
            LOADER_PATH, FALLBACK_LOADER_PATH,
        )  # fmt: skip
    staged.unlink()
    log.info("installed %s (%s)", info, ", ".join(copies))
    return Installed(info, option, copies)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def _replace(path: Path, data: bytes, which: str, step: Checkpoint) -> None:
    """`path` becomes `data`: `.new` written, fsynced and read back; the old file
    removed; `.new` renamed; read back."""
    new = path.with_name(path.name + ".new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_fat(new, data)
        syncfs(path.parent)
        _check_holds(new, data)
        step(f"{which}-written")
        path.unlink(missing_ok=True)
        syncfs(path.parent)
        step(f"{which}-removed")
        new.rename(path)
        # The whole file system, not the directory: on FAT a rename that fsync of the
        # directory "made durable" was gone after a power cut (testbed scenario 13).
        syncfs(path.parent)
        _check_holds(path, data)
        step(f"{which}-renamed")
    except OSError as exc:
        where = exc.filename or path
        raise LocalError(f"{where}: cannot write the boot loader: {exc.strerror}") from None


def _write_fat(path: Path, data: bytes) -> None:
    """`data` straight into `path` (on FAT, with no atomic rename: `_replace` makes
    the order safe), replaced whole and fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_holds(path: Path, data: bytes) -> None:
    with path.open("rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # from the disk
        if handle.read() != data:
            raise VerificationError(f"{path}: read back, it is not the boot loader written")


# --- what the firmware will check -------------------------------------------------------


def check_secure_boot(path: Path, data: bytes, efivars_dir: Path) -> str:
    """VerificationError unless the firmware would start the EFI image `path` (its
    bytes `data`) with the db and dbx it holds now (`firmware.verify`). The subject of
    the db certificate that verifies it."""
    db = firmware.read_database(efivars_dir, "db")
    entry = firmware.verify(path, data, db, firmware.read_database(efivars_dir, "dbx"))
    return firmware.subject(entry.data)


# --- the boot option ---------------------------------------------------------------------

_OPTION = re.compile(r"^Boot(?P<number>[0-9A-Fa-f]{4})\*?\s.*File\((?P<file>[^)]*)\)", re.M)
_LOADER_FILE = efi_file_path(LOADER_PATH)  # as the boot option names it


def boot_option(efivars_dir: Path) -> str | None:
    """The `Boot####` variable that names the main copy, None if none does (or no
    `efibootmgr`, or no efivarfs: then the firmware starts the fallback copy)."""
    if not efivars_dir.is_dir():
        return None
    try:
        done = run.run(["efibootmgr", "-v"], check=False, timeout=60)
    except LocalError:
        return None
    if done.returncode != 0:
        return None
    for match in _OPTION.finditer(done.stdout.decode(errors="replace")):
        if match["file"].lower() == _LOADER_FILE.lower():
            return f"Boot{match['number'].upper()}"
    return None


def _ensure_boot_option(root: Path, efivars_dir: Path) -> bool:
    """Whether a boot option names the main copy, once `efibootmgr` was asked to add
    one (first in BootOrder) if none did."""
    if boot_option(efivars_dir) is not None:
        return True
    where = esp_partition(root)
    if where is None:
        return False
    disk, number = where
    try:
        done = run.run(
            ["efibootmgr", "--create", "--disk", disk, "--part", str(number),
             "--label", BOOT_OPTION_LABEL, "--loader", _LOADER_FILE],
            check=False, timeout=60,
        )  # fmt: skip
    except LocalError as exc:
        log.warning("no boot option added: %s", exc)
        return False
    if done.returncode != 0:
        log.warning("efibootmgr could not add a boot option: %s", done.stderr.decode()[-200:])
        return False
    return boot_option(efivars_dir) is not None


def esp_partition(root: Path) -> tuple[str, int] | None:
    """The disk and partition number of the file system mounted at `root` (the ESP),
    or None if it is not a partition of a disk."""
    done = run.run(["findmnt", "-n", "-o", "SOURCE", "--target", str(root)], check=False)
    source = done.stdout.decode().strip()
    if done.returncode != 0 or not source.startswith("/dev/"):
        return None
    name = Path(source).resolve().name
    number_file = Path("/sys/class/block") / name / "partition"
    try:
        number = int(number_file.read_text())
        disk = (Path("/sys/class/block") / name).resolve().parent.name
    except (OSError, ValueError):
        return None
    return f"/dev/{disk}", number


# --- status ------------------------------------------------------------------------------


def status(esp: Esp, directory: Path, efivars_dir: Path) -> dict[str, object]:
    """What `rampart status` and `rampart bootloader status` show: each copy's
    LoaderInfo (None: missing; "unreadable: ..." if it is not a systemd-boot), the one
    the firmware started this boot (the LoaderInfo variable), the boot option that
    names the main copy, and what is staged."""
    root = esp.directory.parent.parent
    copies: dict[str, str | None] = {}
    for relative in (LOADER_PATH, FALLBACK_LOADER_PATH):
        try:
            copies[relative] = bootloader.loader_info((root / relative).read_bytes(), relative)
        except FileNotFoundError:
            copies[relative] = None
        except (OSError, FormatError) as exc:
            copies[relative] = f"unreadable: {exc}"
    running = None
    found = efivars.read_variable(efivars_dir, "LoaderInfo", efivars.LOADER_VENDOR)
    if found is not None:
        running = found[1].decode("utf-16-le", errors="replace").rstrip("\0")
    staged = {}
    for path in sorted(directory.glob("*.efi")) if directory.is_dir() else ():
        try:
            staged[path.stem] = bootloader.loader_info(path.read_bytes(), str(path))
        except (OSError, FormatError) as exc:
            staged[path.stem] = f"unreadable: {exc}"
    return {
        "copies": copies,
        "running": running,
        "boot_option": boot_option(efivars_dir),
        "staged": staged,
    }


def render_status(found: dict[str, object]) -> str:
    """`status` as lines of text."""
    copies = found["copies"]
    lines = []
    if isinstance(copies, dict):
        for relative, info in copies.items():
            lines.append(f"{relative}: {info or 'missing'}")
    lines.append(f"started this boot: {found['running'] or 'unknown (no LoaderInfo variable)'}")
    lines.append(f"boot option for {LOADER_PATH}: {found['boot_option'] or 'none'}")
    staged = found["staged"]
    if isinstance(staged, dict) and staged:
        for version, info in staged.items():
            lines.append(f"staged for {version}: {info} (installed after its good boot)")
    return "\n".join(lines)
