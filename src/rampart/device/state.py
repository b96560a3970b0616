"""The encrypted state partition: LUKS2 with integrity, its key sealed to
the TPM, a recovery passphrase beside it.

`core_state` is a LUKS2 volume, aes-xts-plain64 with a 512-bit key and
hmac-sha256 integrity tags (dm-crypt over dm-integrity, as CLIP OS). It has two
keyslots:

    0 (tpm.TPM_KEYSLOT)       a random 32-byte key, sealed to the TPM under a
                              PolicyPCR on the configured PCRs (PCR 7 by default);
                              PBKDF2 with the minimum cost, as the key has full
                              entropy (what systemd-cryptenroll does for TPM2)
    1 (tpm.RECOVERY_KEYSLOT)  the recovery passphrase: 256 bits shown once as
                              eight groups of eight modhex letters; argon2id

The sealed object is on the ESP, `<ESP>/rampart/tpm/state.pub`, `state.priv`
and `state.pcrs` (the PCR selection, like `sha256:7`), where the initramfs
finds it. It is no secret: only this TPM, in this boot state, unseals it.

Secrets reach cryptsetup on stdin or through an in-memory file (run.secret_file),
never through a file on disk or the command line, and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from rampart import run
from rampart.contracts import layout
from rampart.device import tpm
from rampart.errors import LocalError, UsageError
from rampart.files import syncfs

log = logging.getLogger(__name__)

CIPHER = "aes-xts-plain64"
KEY_BITS = 512
INTEGRITY = "hmac-sha256"
KEY_BYTES = 32
MAPPER = layout.STATE_MAPPER  # /dev/mapper/state, as the initramfs names it
# The recovery passphrase: modhex letters (unambiguous on any keyboard layout).
MODHEX = "cbdefghijklnrtuv"
RECOVERY_GROUPS = 8
RECOVERY_GROUP_LENGTH = 8
_FORMAT_TIMEOUT = 3600.0  # the integrity wipe writes the whole volume
_TIMEOUT = 600.0


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_recovery_passphrase() -> str:
    """256 random bits as eight dash-separated groups of eight modhex letters."""
    letters = "".join(
        secrets.choice(MODHEX) for _ in range(RECOVERY_GROUPS * RECOVERY_GROUP_LENGTH)
    )
    groups = [
        letters[i : i + RECOVERY_GROUP_LENGTH]
        for i in range(0, len(letters), RECOVERY_GROUP_LENGTH)
    ]
    return "-".join(groups)


def _recovery_slot_args() -> list[str]:
    return ["--pbkdf", "argon2id", "--pbkdf-memory", "65536", "--iter-time", "1000"]


def _key_slot_args() -> list[str]:
    return ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"]


def format_volume(device: Path, key: bytes, passphrase: str, *, integrity: bool = True) -> None:
    """Make `device` a LUKS2 volume opened by `key` (keyslot 0) and `passphrase`
    (keyslot 1). With `integrity` (the device), dm-integrity tags every sector
    and luksFormat wipes the volume to initialise them; without (host tests,
    which have no device-mapper), plain dm-crypt."""
    if len(key) != KEY_BYTES or not passphrase:
        raise UsageError("a state key is 32 bytes and the passphrase is not empty")
    argv = [
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        CIPHER,
        "--key-size",
        str(KEY_BITS),
        *(["--integrity", INTEGRITY] if integrity else []),
        "--label",
        "rampart-state",
        *_key_slot_args(),
        "--key-slot",
        str(tpm.TPM_KEYSLOT),
        "--key-file=-",
        str(device),
    ]
    run.run(argv, input=key, timeout=_FORMAT_TIMEOUT)
    add_secret(device, key, passphrase.encode(), tpm.RECOVERY_KEYSLOT, recovery=True)


def add_secret(device: Path, existing: bytes, new: bytes, slot: int, *, recovery: bool) -> None:
    """Add `new` as keyslot `slot`, authorised by `existing` (any other keyslot's)."""
    with run.secret_file(new) as (fd, path):
        run.run(
            [
                "cryptsetup",
                "luksAddKey",
                "--batch-mode",
                *(_recovery_slot_args() if recovery else _key_slot_args()),
                "--key-slot",
                str(slot),
                "--key-file=-",
                str(device),
                path,
            ],
            input=existing,
            pass_fds=(fd,),
            timeout=_TIMEOUT,
        )


def opens(device: Path, secret: bytes, slot: int) -> bool:
    """True if `secret` opens keyslot `slot` of `device` (nothing is activated)."""
    done = run.run(
        [
            "cryptsetup",
            "open",
            "--test-passphrase",
            "--type",
            "luks2",
            "--key-slot",
            str(slot),
            "--key-file=-",
            str(device),
        ],
        input=secret,
        check=False,
        timeout=_TIMEOUT,
    )
    return done.returncode == 0


def activate(device: Path, key: bytes, name: str = MAPPER) -> Path:
    """Open the volume as /dev/mapper/<name> with the key of keyslot 0."""
    run.run(
        [
            "cryptsetup",
            "open",
            "--type",
            "luks2",
            "--key-slot",
            str(tpm.TPM_KEYSLOT),
            "--key-file=-",
            str(device),
            name,
        ],
        input=key,
        timeout=_TIMEOUT,
    )
    return Path("/dev/mapper") / name


def deactivate(name: str = MAPPER) -> None:
    run.run(["cryptsetup", "close", name], timeout=_TIMEOUT)


def sealed_paths(esp_root: Path) -> tuple[Path, Path, Path]:
    """The sealed object's files on the ESP: (pub, priv, pcrs)."""
    directory = esp_root / tpm.SEALED_DIR
    return (
        directory / tpm.SEALED_PUB,
        directory / tpm.SEALED_PRIV,
        directory / tpm.SEALED_PCRS,
    )


def sealed_branches(esp_root: Path) -> list[bytes]:
    """The policy digests of the sealed key's PolicyOR branches on the ESP, in order
    (none: it is sealed to one set of PCR values)."""
    directory = esp_root / tpm.SEALED_DIR
    found = []
    for number in range(tpm.MAX_BRANCHES):
        path = directory / f"{tpm.SEALED_BRANCH}{number}"
        if not path.is_file():
            break
        found.append(path.read_bytes())
    return found


def seal_to_esp(
    device_tpm: tpm.Tpm,
    key: bytes,
    esp_root: Path,
    pcrs: Sequence[int],
    values: Sequence[bytes] = (),
) -> None:
    """Seal `key` to the current values of `pcrs` (or to any one of `values`: a
    PolicyOR, `Tpm.seal`) and store the object on the ESP, with its branches.

    The files are written under temporary names and renamed (the branches first, the
    private part last); a crash in between leaves a set the TPM cannot unseal with,
    and the boot asks for the recovery passphrase: nothing is lost."""
    pub, priv, pcr_file = sealed_paths(esp_root)
    pub.parent.mkdir(parents=True, exist_ok=True)
    staging = pub.parent / ".new"
    staging.mkdir(exist_ok=True)
    try:
        new_pub, new_priv = staging / tpm.SEALED_PUB, staging / tpm.SEALED_PRIV
        branches = device_tpm.seal(key, new_pub, new_priv, pcrs, values)
        new_pcrs = staging / tpm.SEALED_PCRS
        new_pcrs.write_text(tpm.pcr_selection(pcrs) + "\n")
        names = [f"{tpm.SEALED_BRANCH}{n}" for n in range(len(branches))]
        for name, branch in zip(names, branches, strict=True):
            (staging / name).write_bytes(branch)
        for path in (new_pub, new_priv, new_pcrs, *(staging / n for n in names)):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        syncfs(staging)  # the ESP is FAT: fsync of a directory did not make renames durable
        for number in range(tpm.MAX_BRANCHES):  # the old branches, from the last
            stale = pub.parent / f"{tpm.SEALED_BRANCH}{tpm.MAX_BRANCHES - 1 - number}"
            if stale.name not in names:
                stale.unlink(missing_ok=True)
        for name in names:
            os.replace(staging / name, pub.parent / name)
        os.replace(new_pcrs, pcr_file)
        os.replace(new_pub, pub)
        os.replace(new_priv, priv)
        syncfs(pub.parent)
    finally:
        for leftover in staging.glob("*"):
            leftover.unlink()
        staging.rmdir()


def reseal(
    device: Path, esp_root: Path, device_tpm: tpm.Tpm, passphrase: str, pcrs: Sequence[int]
) -> None:
    """After a legitimate change of the Secure Boot state: replace keyslot 0 with a
    new random key sealed to the current PCR values, authorised by the recovery
    passphrase (keyslot 1).

    Order, so that a crash at any point loses nothing (the passphrase always opens
    the volume): check the passphrase; seal the new key and store it on the ESP;
    kill keyslot 0; add the new key as keyslot 0."""
    secret = passphrase.encode()
    if not opens(device, secret, tpm.RECOVERY_KEYSLOT):
        raise LocalError(f"{device}: the recovery passphrase does not open the state partition")
    key = new_key()
    seal_to_esp(device_tpm, key, esp_root, pcrs)
    log.info("reseal: new key sealed to PCR %s, replacing keyslot %d", pcrs, tpm.TPM_KEYSLOT)
    if _slot_active(device, tpm.TPM_KEYSLOT):
        run.run(
            ["cryptsetup", "luksKillSlot", "--batch-mode", "--key-file=-", str(device), "0"],
            input=secret,
            timeout=_TIMEOUT,
        )
    add_secret(device, secret, key, tpm.TPM_KEYSLOT, recovery=False)
    if not opens(device, key, tpm.TPM_KEYSLOT):
        raise LocalError(f"{device}: the new key does not open keyslot {tpm.TPM_KEYSLOT}")


def _slot_active(device: Path, slot: int) -> bool:
    done = run.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(device)], timeout=_TIMEOUT
    )
    try:
        slots = json.loads(done.stdout)["keyslots"]
    except (ValueError, KeyError, TypeError):
        raise LocalError(f"{device}: cannot read its LUKS2 metadata") from None
    return str(slot) in slots
