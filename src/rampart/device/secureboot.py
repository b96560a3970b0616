"""Secure Boot variable updates, and PCR 7 sealing that follows them (docs/client.md
"Secure Boot variable updates" and "PCR 7 without the passphrase").

A release may carry signed appends to db and dbx (`<os>-db.auth`, `<os>-dbx.auth`:
what `rampart keys db-append|dbx-append` makes, signed with a KEK). The update
fetches and verifies them with the release and stages them beside its boot loader
(`stage`); nothing changes then. Once that release has booted and been marked good,
`rampart secureboot apply` (rampart-bootloader.service) applies them (`apply`), in
this order: the db append, the boot loader (`bootloader.install`), the dbx append.
db grows before anything signed by its new certificate is installed; dbx shrinks
what starts only after the loader that might be revoked was replaced.

Before any write:
- a dbx append is checked against every EFI image that can start next: both copies
  of the boot loader (or the loader about to replace them) and the UKI of every
  installed version not marked bad. If the firmware would refuse one of them with
  the new db and dbx (`firmware.verify`), the append is refused, named with the
  images, and recorded: the variables are unchanged;
- the state key is sealed anew (`seal_for_next_boot`) so that it unseals with PCR 7
  as it is now and as it will be at the next boot, whichever of the images starts
  and wherever a crash stops the writes: a TPM2_PolicyOR of up to 8 PCR values.

The write is one write(2) of the signed update to the variable's efivarfs file
(append, as its attributes say); the firmware checks its KEK signature, and EACCES
means it refused it (recorded as rejected; the device boots on as before). Each
update is recorded by its SHA-256 in `secureboot.json` beside the staged files,
applied once, and shown by `rampart status`.

After the next good boot, `apply` finds the current PCR 7 among the sealed values
and seals the key to what can start next only, which drops the old value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rampart.contracts import efivars, wire
from rampart.contracts.layout import FALLBACK_LOADER_PATH, LOADER_PATH
from rampart.contracts.version import Version
from rampart.device import bootloader, bootonce, firmware, pcr7, state, tpm
from rampart.device.documents import Trust, signed_document
from rampart.device.esp import Esp
from rampart.device.fetch import Fetcher
from rampart.errors import ConflictError, FormatError, LocalError, VerificationError
from rampart.files import replace_whole

log = logging.getLogger(__name__)

RECORD = "secureboot.json"
# db and dbx take exactly these attributes (with APPEND_WRITE for an append): the
# firmware refuses others (edk2 VarCheck).
DATABASE_ATTRIBUTES = (
    efivars.NON_VOLATILE
    | efivars.BOOTSERVICE_ACCESS
    | efivars.RUNTIME_ACCESS
    | efivars.TIME_BASED_AUTHENTICATED_WRITE_ACCESS
)


def staged_path(directory: Path, version: Version, variable: str) -> Path:
    return directory / f"{version.core}.{variable}.auth"


def check_update(variable: str, data: bytes, source: str) -> list[efivars.Signature]:
    """The entries a signed update of `variable` appends; FormatError unless it is an
    authenticated append with db's and dbx's attributes that appends something."""
    write = efivars.parse_authenticated_write(data, source)
    if not write.attributes & efivars.APPEND_WRITE:
        raise FormatError(
            f"{source}: not an append (attributes {write.attributes:#x} lack APPEND_WRITE); "
            f"Rampart applies appends to {variable} only"
        )
    if write.attributes & ~efivars.APPEND_WRITE != DATABASE_ATTRIBUTES:
        raise FormatError(
            f"{source}: attributes {write.attributes:#x}; {variable} takes "
            f"{DATABASE_ATTRIBUTES | efivars.APPEND_WRITE:#x}"
        )
    entries = efivars.parse_signature_lists(write.payload, source)
    if not entries:
        raise FormatError(f"{source}: appends no entry to {variable}")
    return entries


def stage(
    fetcher: Fetcher,
    trust: Trust,
    dist_url: str,
    os_name: str,
    version: Version,
    directory: Path,
) -> list[str]:
    """Fetch and verify the db and dbx appends release `version` carries and keep
    them in `directory` (mode 0600, whole or not at all), for `apply` after its good
    boot; the variables staged. Appends staged for other versions are removed."""
    found = {}
    for variable in wire.SBVARS:
        name = wire.sbvar_name(os_name, variable)
        data = signed_document(fetcher, trust, dist_url, version, name, wire.SBVAR_MAX)
        if data is not None:
            check_update(variable, data, name)
            found[variable] = data
    if directory.is_dir():
        for path in directory.glob("*.auth"):
            path.unlink()
    try:
        for variable, data in found.items():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            replace_whole(staged_path(directory, version, variable), data, mode=0o600)
    except OSError as exc:
        raise LocalError(
            f"{directory}: cannot stage a Secure Boot update: {exc.strerror}"
        ) from None
    if found:
        log.info("%s carries appends to %s: staged until its good boot", version, ", ".join(found))
    return list(found)


# --- the record --------------------------------------------------------------------------


def read_record(directory: Path) -> dict[str, object]:
    """`secureboot.json`: {"updates": [...], "sealed": {...}}; empty if none."""
    path = directory / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {"updates": [], "sealed": None}
    except (OSError, ValueError) as exc:
        raise LocalError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("updates"), list):
        raise LocalError(f"{path}: not a record of Secure Boot updates")
    return record


def _write_record(directory: Path, record: dict[str, object]) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
    replace_whole(directory / RECORD, data, mode=0o600)


def _updates(record: dict[str, object]) -> list[dict[str, object]]:
    updates = record["updates"]
    if not isinstance(updates, list):
        raise LocalError(f"{RECORD}: its updates are not a list")
    return updates


def _note(directory: Path, update: Update, result: str, detail: str = "") -> None:
    record = read_record(directory)
    _updates(record).append(
        {
            "variable": update.variable,
            "version": update.version.core,
            "sha256": update.sha256,
            "result": result,
            "detail": detail,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    _write_record(directory, record)
    update.path.unlink(missing_ok=True)


def forget_sealing(directory: Path) -> None:
    """The state key was sealed anew by other means (`rampart tpm reseal`): the PCR 7
    values recorded are no longer what it is sealed to."""
    record = read_record(directory)
    if record.get("sealed") is not None:
        record["sealed"] = None
        _write_record(directory, record)


# --- what can start next -----------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    variable: str
    version: Version
    path: Path
    data: bytes
    sha256: str
    entries: list[efivars.Signature]


@dataclass(frozen=True)
class Databases:
    """db and dbx (their bytes in efivarfs, and entries), now or after some writes."""

    db: bytes
    dbx: bytes
    why: str

    def entries(self) -> tuple[list[efivars.Signature], list[efivars.Signature]]:
        return (
            efivars.parse_signature_lists(self.db, "db"),
            efivars.parse_signature_lists(self.dbx, "dbx"),
        )

    def after(self, update: Update) -> Databases:
        payload = efivars.parse_authenticated_write(update.data, update.variable).payload
        if update.variable == "db":
            return Databases(efivars.appended_bytes(self.db, payload, "db"), self.dbx, "db")
        new_dbx = efivars.appended_bytes(self.dbx, payload, "dbx")
        return Databases(self.db, new_dbx, f"{self.why}+dbx")


def current_databases(efivars_dir: Path) -> Databases:
    db = efivars.read_variable(efivars_dir, "db", efivars.IMAGE_SECURITY_DATABASE)
    if db is None:
        raise VerificationError(f"{efivars_dir}: no db variable (Secure Boot keys not enrolled?)")
    dbx = efivars.read_variable(efivars_dir, "dbx", efivars.IMAGE_SECURITY_DATABASE)
    return Databases(db[1], b"" if dbx is None else dbx[1], "now")


@dataclass(frozen=True)
class Image:
    """An EFI image that can start at the next boot."""

    name: str
    data: bytes


def loader_images(esp: Esp, staged: Path | None) -> list[Image]:
    """The boot loader's copies on the ESP, and the staged loader that will replace
    them (distinct contents only)."""
    root = esp.directory.parent.parent
    found: list[Image] = []
    places: list[tuple[str, Path | None]] = [
        (LOADER_PATH, root / LOADER_PATH),
        (FALLBACK_LOADER_PATH, root / FALLBACK_LOADER_PATH),
        ("the staged boot loader", staged),
    ]
    for name, path in places:
        if path is None:
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LocalError(f"{path}: cannot read it: {exc.strerror}") from None
        if all(image.data != data for image in found):
            found.append(Image(name, data))
    return found


def uki_images(esp: Esp, extra: Iterable[Image] = ()) -> list[Image]:
    """The UKI of every installed version not marked bad, and `extra` (one about to
    be installed)."""
    found = [
        Image(entry.path.name, entry.path.read_bytes()) for entry in esp.entries() if not entry.bad
    ]
    return [*found, *extra]


def refusals(databases: Databases, images: Sequence[Image]) -> list[str]:
    """Why the firmware would refuse each of `images` with `databases` (none: all start)."""
    db, dbx = databases.entries()
    found = []
    for image in images:
        try:
            firmware.verify(Path(image.name), image.data, db, dbx)
        except (VerificationError, FormatError) as exc:
            found.append(str(exc))
    return found


# --- sealing for the next boot -----------------------------------------------------------


@dataclass
class Sealing:
    """The TPM and the sealed state key on the ESP, when the key is sealed to PCR 7."""

    tpm: tpm.Tpm
    esp_root: Path
    pcrs: tuple[int, ...]
    event_log: Path = pcr7.LOG
    _verified: dict[tuple[bytes, bytes, bytes], efivars.Signature | None] = field(
        default_factory=dict
    )

    def verified_by(self, databases: Databases, image: Image) -> efivars.Signature | None:
        key = (hashlib.sha256(image.data).digest(), databases.db, databases.dbx)
        if key not in self._verified:
            db, dbx = databases.entries()
            try:
                self._verified[key] = firmware.verify(Path(image.name), image.data, db, dbx)
            except (VerificationError, FormatError):
                self._verified[key] = None
        return self._verified[key]


def sealing(efivars_dir: Path, esp: Esp, tcti: str, pcrs: Sequence[int]) -> Sealing | None:
    """The sealing to keep in step with Secure Boot changes; None if the state key is
    not sealed to PCR 7 on this machine (no TPM, no sealed key, or no Secure Boot)."""
    root = esp.directory.parent.parent
    pub, priv, _ = state.sealed_paths(root)
    if pcr7.PCR not in pcrs or not (pub.is_file() and priv.is_file()):
        return None
    if not tpm.secure_boot_enabled(efivars_dir) or not tpm.present(tcti):
        return None
    return Sealing(tpm.Tpm(tcti), root, tuple(pcrs))


@dataclass(frozen=True)
class NextBoot:
    """What the next boot can start: the databases now and after each write still to
    come (`states`), the loaders and the UKIs; and the UKI that runs now."""

    states: Sequence[Databases]
    loaders: Sequence[Image]
    ukis: Sequence[Image]
    running: Image | None = None


def next_boot_values(sealing: Sealing, next_boot: NextBoot) -> tuple[bytes, list[bytes]]:
    """PCR 7 now, and every PCR 7 the next boot can have: for each of `states` (the
    databases now and after each write still to come), each loader and each UKI the
    firmware would start with them, the prediction from the event log (`pcr7.predict`).

    The authority events are predicted from the db entries that verify the loader and
    the UKI, once that model explains this boot's log: a loader and a UKI on the ESP
    give PCR 7 now, or (the loader that started this boot was replaced since) the
    logged authorities are one or two db entries, the last the one that verifies the
    `running` UKI. If neither holds (the firmware measured something else), the
    logged authority events are kept, which holds while the same db entries verify
    the next boot's images. VerificationError if the event log does not replay to
    PCR 7 now."""
    states, loaders, ukis = next_boot.states, next_boot.loaders, next_boot.ukis
    current = sealing.tpm.pcr_values([pcr7.PCR])[pcr7.PCR]
    events = pcr7.read_log(sealing.event_log)
    pcr7.check(events, current, str(sealing.event_log))
    now = states[0]

    def authorities(databases: Databases, loader: Image, uki: Image) -> list[bytes] | None:
        found: list[bytes] = []
        for image in (loader, uki):
            entry = sealing.verified_by(databases, image)
            if entry is None:
                return None
            measured = pcr7.signature_data(entry.owner, entry.data)
            if measured not in found:
                found.append(measured)
        return found

    modelled = any(
        (found := authorities(now, loader, uki)) is not None
        and pcr7.predict(events, {}, found) == current
        for loader in loaders
        for uki in ukis
    ) or _logged_as_modelled(sealing, now, events, next_boot.running)
    if not modelled:
        log.warning(
            "PCR 7: the authority events of this boot are not those of its loader and UKI; "
            "predicting with the logged ones"
        )
    values: list[bytes] = []
    for databases in states:
        # Even for the databases now: a write since this boot's log (an update after
        # a db append, before the reboot) is what the next boot measures.
        variables = {"db": databases.db, "dbx": databases.dbx}
        for loader in loaders:
            for uki in ukis:
                found = authorities(databases, loader, uki)
                if found is None:
                    continue  # the firmware would not start this pair: no boot to seal for
                value = pcr7.predict(events, variables, found if modelled else None)
                if value != current and value not in values:
                    values.append(value)
    return current, values


def _logged_as_modelled(
    sealing: Sealing, now: Databases, events: Sequence[pcr7.Event], running: Image | None
) -> bool:
    """Whether this boot's authority events are what the model makes of a loader that
    is gone from the ESP and the `running` UKI: one or two db entries, the last the
    one that verifies the UKI."""
    if running is None:
        return False
    entry = sealing.verified_by(now, running)
    logged = [e.variable.data for e in events if e.type == pcr7.AUTHORITY and e.variable]
    if entry is None or not 1 <= len(logged) <= 2:
        return False
    db = {pcr7.signature_data(s.owner, s.data) for s in now.entries()[0]}
    return logged[-1] == pcr7.signature_data(entry.owner, entry.data) and set(logged) <= db


def seal_for_next_boot(
    sealing: Sealing, directory: Path, current: bytes, predicted: Sequence[bytes], why: str
) -> bool:
    """Seal the state key (the same key: unsealed now) so that it unseals with PCR 7
    `current` or any of `predicted`; nothing if it is sealed to just these already.
    Whether it was sealed anew. LocalError if there are more than the TPM's PolicyOR
    takes (8 values)."""
    wanted = [current, *predicted]
    if len(wanted) > tpm.MAX_BRANCHES:
        raise LocalError(
            f"PCR 7: {len(wanted)} values can follow this boot, a PolicyOR takes "
            f"{tpm.MAX_BRANCHES}; apply fewer Secure Boot changes at once"
        )
    record = read_record(directory)
    sealed = record.get("sealed")
    branches = len(state.sealed_branches(sealing.esp_root))
    if (
        isinstance(sealed, dict)
        and sealed.get("pcr7") == [v.hex() for v in wanted]
        and branches == (len(wanted) if len(wanted) > 1 else 0)
    ):
        return False
    if (
        not isinstance(sealed, dict)
        and not predicted
        and not state.sealed_branches(sealing.esp_root)
    ):
        return False  # sealed to the current PCRs already (at installation or reseal)
    pub, priv, _ = state.sealed_paths(sealing.esp_root)
    key = sealing.tpm.unseal(pub, priv, sealing.pcrs, state.sealed_branches(sealing.esp_root))
    others = (
        sealing.tpm.pcr_values([p for p in sealing.pcrs if p != pcr7.PCR])
        if len(sealing.pcrs) > 1
        else {}
    )
    values = []
    for pcr7_value in wanted:
        both = {**others, pcr7.PCR: pcr7_value}
        values.append(b"".join(both[p] for p in sealing.pcrs))
    state.seal_to_esp(
        sealing.tpm, key, sealing.esp_root, sealing.pcrs, values if len(values) > 1 else ()
    )
    record = read_record(directory)
    record["sealed"] = {"pcr7": [v.hex() for v in wanted], "why": why}
    _write_record(directory, record)
    if predicted:
        log.info(
            "state key sealed to PCR 7 now and %d value(s) predicted (%s)", len(predicted), why
        )
    else:
        log.info("state key sealed to PCR 7 now only")
    return True


# --- apply ---------------------------------------------------------------------------------


@dataclass
class Applied:
    applied: list[str] = field(default_factory=list)  # variables written
    refused: list[str] = field(default_factory=list)  # why an update was refused or rejected
    loader: bootloader.Installed | None = None
    resealed: bool = False


def pending(directory: Path, version: Version) -> list[Update]:
    """The updates staged for `version` and not yet recorded, in the order they apply."""
    done = {
        str(u.get("sha256"))
        for u in _updates(read_record(directory))
        if isinstance(u, dict) and u.get("result") == "applied"
    }  # a refused or rejected one is tried again when a release carries it again
    found = []
    for variable in wire.SBVARS:
        path = staged_path(directory, version, variable)
        if not path.is_file():
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in done:
            log.info("%s: applied already (%s)", path.name, digest[:16])
            path.unlink()
            continue
        entries = check_update(variable, data, str(path))
        found.append(Update(variable, version, path, data, digest, entries))
    return found


def apply(
    esp: Esp,
    directory: Path,
    running: Version,
    efivars_dir: Path,
    seal: Sealing | None,
    halt_at: str | None = None,
) -> Applied:
    """Apply what the running version staged (see the module's docstring): the db
    append, the boot loader, the dbx append; and keep the sealed state key in step.
    ConflictError before the running version is marked good."""
    entry = esp.find(running)
    if entry is None or entry.counted:
        raise ConflictError(
            f"{running.core}: not marked good yet; its Secure Boot updates and boot loader "
            "are applied after its good boot (rampart mark-good)"
        )
    result = Applied()
    updates = pending(directory, running)
    staged_loader = bootloader.staged_path(directory, running)
    loaders = loader_images(esp, staged_loader if staged_loader.is_file() else None)
    ukis = uki_images(esp)
    states = [current_databases(efivars_dir)] if updates or seal is not None else []
    final_loaders = (  # what the ESP holds once the loader is installed
        [Image("the staged boot loader", staged_loader.read_bytes())]
        if staged_loader.is_file()
        else loader_images(esp, None)
    )
    for update in list(updates):
        after = states[-1].after(update)
        refused = refusals(after, [*final_loaders, *ukis]) if update.variable == "dbx" else []
        if refused:
            reason = "; ".join(refused)
            log.error("refused the dbx update staged for %s: %s", running, reason)
            _note(directory, update, "refused", reason)
            result.refused.append(f"dbx: {reason}")
            updates.remove(update)
        else:
            states.append(after)
    changing = bool(updates) or staged_loader.is_file()
    if seal is not None and (changing or _several(seal, directory)):
        next_boot = NextBoot(states, loaders, ukis, Image(entry.path.name, entry.path.read_bytes()))
        result.resealed = _seal(seal, directory, next_boot, updates, changing)
    for update in updates:
        if update.variable == "dbx":
            result.loader = bootloader.install(
                esp, directory, running, efivars_dir, halt_at=halt_at
            )
        if _write_variable(efivars_dir, update, directory, result):
            result.applied.append(update.variable)
    if not any(u.variable == "dbx" for u in updates):
        result.loader = bootloader.install(esp, directory, running, efivars_dir, halt_at=halt_at)
    return result


def before_install(
    esp: Esp,
    directory: Path,
    version: Version,
    running: Version,
    efivars_dir: Path,
    uki: bytes,
    seal: Sealing | None,
) -> None:
    """Before an update installs `version`'s UKI (Secure Boot on): VerificationError
    unless the firmware will start it, with db as it is, or once the db append
    `version` carries is applied: then that append is applied now, before the UKI is
    installed (a rotation in one release: the new certificate lands first). If the
    state key is sealed to PCR 7 and the next boot's PCR 7 may differ (the append, or
    another db entry verifying the new UKI), it is sealed for that boot first."""
    databases = current_databases(efivars_dir)
    new = Image(f"the UKI of {version.core}", uki)
    states = [databases]
    db_update = None
    if refusals(databases, [new]):
        db_update = next((u for u in pending(directory, version) if u.variable == "db"), None)
        if db_update is not None:
            states.append(databases.after(db_update))
    refused = refusals(states[-1], [new])
    if refused:
        raise VerificationError(f"{refused[0]}: not installed")
    entry = esp.find(running)
    if seal is not None and entry is not None:
        running_uki = Image(entry.path.name, entry.path.read_bytes())
        now = seal.verified_by(databases, running_uki)
        if db_update is not None or now is None or seal.verified_by(databases, new) != now:
            next_boot = NextBoot(
                states, loader_images(esp, None), uki_images(esp, [new]), running_uki
            )
            current, predicted = next_boot_values(seal, next_boot)
            why = f"the UKI of {version.core}" + (" and its db append" if db_update else "")
            seal_for_next_boot(seal, directory, current, predicted, why)
    if db_update is not None:
        result = Applied()
        if not _write_variable(efivars_dir, db_update, directory, result):
            raise VerificationError(f"{result.refused[0]}; the UKI of {version.core} needs it")
        log.info("applied the db append of %s before installing its UKI", version)


def write_efivar(path: Path, data: bytes) -> None:
    """One write(2) of `data` (attributes, then the value) to the efivarfs file
    `path`: efivarfs makes it one SetVariable call, which for an authenticated write
    the firmware checks (EACCES: refused). The file is made mutable first (efivarfs
    marks variables immutable)."""
    if path.exists():
        bootonce.make_mutable(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _seal(
    seal: Sealing,
    directory: Path,
    next_boot: NextBoot,
    updates: Sequence[Update],
    changing: bool,
) -> bool:
    """Seal the state key for what can start next; whether it was sealed anew. A PCR 7
    that cannot be predicted stops `apply` while something is to change (nothing is
    written), and leaves the sealing as it is otherwise."""
    try:
        current, predicted = next_boot_values(seal, next_boot)
    except VerificationError as exc:
        if changing:
            raise
        log.warning("PCR 7 not predicted (%s): the sealed key is left as it is", exc)
        return False
    why = ", ".join(f"{u.variable} append of {u.version}" for u in updates)
    return seal_for_next_boot(seal, directory, current, predicted, why or "the installed versions")


def _several(seal: Sealing, directory: Path) -> bool:
    """Whether the state key is sealed to more than one PCR 7 value now."""
    sealed = read_record(directory).get("sealed")
    return bool(state.sealed_branches(seal.esp_root)) or (
        isinstance(sealed, dict) and len(sealed.get("pcr7") or ()) > 1
    )


def _write_variable(efivars_dir: Path, update: Update, directory: Path, result: Applied) -> bool:
    """Append `update` to its variable through efivarfs (one write: the firmware
    checks the signature), then record it; whether the firmware took it."""
    path = efivars.variable_path(efivars_dir, update.variable, efivars.IMAGE_SECURITY_DATABASE)
    before = efivars.read_variable(efivars_dir, update.variable, efivars.IMAGE_SECURITY_DATABASE)
    try:
        write_efivar(path, update.data)
    except PermissionError:
        reason = (
            f"the firmware rejected the {update.variable} append of {update.version} "
            "(EACCES: not signed by a key of the enrolled KEK)"
        )
        log.error("%s; %s is unchanged", reason, update.variable)
        _note(directory, update, "rejected", reason)
        result.refused.append(f"{update.variable}: {reason}")
        return False
    except OSError as exc:
        raise LocalError(
            f"{path}: cannot write the {update.variable} append: {exc.strerror}"
        ) from None
    after = efivars.read_variable(efivars_dir, update.variable, efivars.IMAGE_SECURITY_DATABASE)
    old = b"" if before is None else before[1]
    payload = efivars.parse_authenticated_write(update.data, update.variable).payload
    expected = efivars.appended_bytes(old, payload, update.variable)
    if after is None or after[1] != expected:
        log.warning(
            "%s after the append is not what was predicted (%d bytes, expected %d)",
            update.variable, 0 if after is None else len(after[1]), len(expected),
        )  # fmt: skip
    _note(directory, update, "applied", f"{len(update.entries)} entries")
    log.info(
        "applied the %s append of %s (%s)", update.variable, update.version, update.sha256[:16]
    )
    return True


# --- status --------------------------------------------------------------------------------


def status(directory: Path) -> dict[str, object]:
    """What `rampart status` shows: the updates recorded, what is staged, and the PCR 7
    values the state key is sealed to (when `apply` sealed it)."""
    record = read_record(directory)
    staged = sorted(p.name for p in directory.glob("*.auth")) if directory.is_dir() else []
    return {"updates": record["updates"], "staged": staged, "sealed": record.get("sealed")}


def render_status(found: dict[str, object]) -> str:
    lines = []
    updates = found["updates"]
    for update in updates if isinstance(updates, list) else ():
        lines.append(
            f"{update['variable']} append of {update['version']}: {update['result']} "
            f"({update['at']}, sha256 {str(update['sha256'])[:16]}...)"
            + (
                f": {update['detail']}"
                if update.get("detail") and update["result"] != "applied"
                else ""
            )
        )
    staged = found["staged"]
    for name in staged if isinstance(staged, list) else ():
        lines.append(f"staged: {name} (applied after its version's good boot)")
    if not lines:
        lines.append("no Secure Boot variable update recorded or staged")
    return "\n".join(lines)
