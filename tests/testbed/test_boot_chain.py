"""Testbed scenario 13 (the boot chain's lifecycle): a boot loader update on the real
firmware. OVMF with Secure Boot enforced runs systemd-boot from the ESP; `rampart
bootloader install` checks the new loader against the firmware's db and dbx (read
from efivarfs), writes its main copy, adds the boot option with efibootmgr, then
writes the fallback copy; the next boot runs it. Then a power cut at each step of an
install where one copy is missing: every time the machine boots (the firmware
starts the other, whole copy), and the boot's own rampart-bootloader.service
completes the install.

Scenario 14 goes on in the same machine (no other boot to pay for): Secure Boot key
rotation and revocation through releases from its own `rampart serve` (another port
than the scenarios process's), see its docstring.

The loaders are Debian's systemd-boot with another version string, signed with the
enrolled db key (`build.renamed_loader`: Debian 12 has one build). They reach the
guest on a read-only second disk and are staged by hand where the update stages a
release's loader (the update's staging, against a real nginx, is
tests/device/test_bootloader.py); so a machine of its own, booted from the installed
disk, with no update server: `make test` runs this in its other pytest process
(scripts/test.sh). Times go to <work>/timings.json and the log."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rampart import run
from rampart.contracts import bootloader
from rampart.contracts.layout import FALLBACK_LOADER_PATH, LOADER_PATH
from rampart.release import secureboot, uki
from rampart.testbed import build, machine, session
from tests.testbed.kit import CORE, PROMPT, UNLOCKED_TPM, boot_next, delete_boot_option

pytestmark = pytest.mark.vm

# Same length as Debian 12's "252.39-1~deb12u2": the strings are replaced in place.
LOADERS = {"new": "252.99-1~deb12u2", "third": "252.98-1~deb12u2"}
ALIGN = 1 << 20
STAGED = f"/var/lib/rampart/bootloader/{build.INSTALLED}.efi"
CUT_AT = ("main-removed", "fallback-removed")  # of bootloader.STEPS
STAGING = "/var/lib/rampart/bootloader"
ROTATED = "252.97-1~deb12u2"  # the loader signed with the rotated db key
SB_PORT = build.SERVER_PORT + 1
log = logging.getLogger(__name__)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("boot-chain")
    yield path
    (path / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    log.warning("testbed boot chain timings (s): %s", json.dumps(TIMINGS))


@pytest.fixture(scope="module")
def rotated(work: Path) -> secureboot.KeySet:
    """The db key a rotation adds (its PK and KEK are not used)."""
    return secureboot.generate_keys(work / "rotated-db", "Rotated db")


@pytest.fixture(scope="module")
def loaders(
    bed: build.Testbed, work: Path, rotated: secureboot.KeySet
) -> dict[str, tuple[int, int, str]]:
    """The files handed to the guest on a raw disk (work/loaders.raw): the loaders,
    and the appends staged by hand. {name: (offset, size, sha256)}."""
    files = {
        name: build.renamed_loader(work / f"{name}.efi", bed.keys, version).read_bytes()
        for name, version in LOADERS.items()
    }
    appends = {
        # a db append signed by a KEK the firmware does not hold
        "rejected-db": (bed.other_keys, "db", {"certificates": [rotated.cert("db")]}),
        # a dbx append revoking the db certificate everything installed is signed with
        "revoke-db": (bed.keys, "dbx", {"certificates": [secureboot.KeySet(bed.keys).cert("db")]}),
    }
    for name, (keys, variable, entries) in appends.items():
        out = work / f"{name}.auth"
        secureboot.signed_append(keys, variable, out, **entries)
        files[name] = out.read_bytes()
    where: dict[str, tuple[int, int, str]] = {}
    with (work / "loaders.raw").open("wb") as out_file:
        for name, data in files.items():
            where[name] = (out_file.tell(), len(data), hashlib.sha256(data).hexdigest())
            out_file.write(data)
            out_file.write(bytes(-out_file.tell() % ALIGN))
    return where


@pytest.fixture(scope="module")
def guest(
    bed: build.Testbed,
    work: Path,
    time_factor: float,
    loaders: dict[str, tuple[int, int, str]],
) -> Iterator[session.Guest]:
    disk = machine.Disk(work / "loaders.raw", "raw", read_only=True)
    with session.Guest(
        bed, work / "guest", time_factor=time_factor, extra_disks=(disk,)
    ) as machine_:
        yield machine_


def _info(name: str) -> str:
    return _info_of(LOADERS[name])


def _info_of(version: str) -> str:
    return f"systemd-boot {version}"


def _stage(
    guest: session.Guest,
    loaders: dict[str, tuple[int, int, str]],
    name: str,
    where: str = STAGED,
) -> None:
    """Put file `name` of the raw disk at `where` (by default where the update stages
    the running release's loader)."""
    offset, size, digest = loaders[name]
    guest.sh(
        f"mkdir -p -m 0700 {Path(where).parent} && dd if=/dev/vdb of={where} bs=1M "
        f"iflag=skip_bytes,count_bytes skip={offset} count={size} status=none && "
        f"chmod 0600 {where} && sync"
    )
    assert guest.sh(f"sha256sum {where}").split()[0] == digest


def _loader_after_the_cuts() -> str:
    """The loader scenario 13's last install leaves: each cut installs the other one."""
    name = "new"
    for _ in CUT_AT:
        name = "third" if name == "new" else "new"
    return name


def _status(guest: session.Guest) -> dict[str, Any]:
    text = guest.sh("rampart bootloader status --json")
    found: dict[str, Any] = json.loads(text[text.find("{") :])
    return found


def test_13_a_boot_loader_update_boots_after_a_power_cut_at_each_step(
    guest: session.Guest, loaders: dict[str, tuple[int, int, str]]
) -> None:
    started = time.monotonic()
    assert guest.boot().core == CORE.format(build.INSTALLED)
    assert guest.wait_system_up() == "running"
    before = _status(guest)
    assert before["copies"][LOADER_PATH] is None
    assert before["copies"][FALLBACK_LOADER_PATH].startswith("systemd-boot 252.39")
    assert before["running"].startswith("systemd-boot 252.39"), before
    # The update after the good boot, by hand: both copies, the boot option.
    _stage(guest, loaders, "new")
    text = guest.sh("rampart bootloader install --json")
    installed = json.loads(text[text.find("{") :])
    assert installed == {
        "installed": _info("new"),
        "boot_option": True,
        "copies": [LOADER_PATH, FALLBACK_LOADER_PATH],
    }
    assert guest.reboot().core == CORE.format(build.INSTALLED)
    assert guest.wait_system_up() == "running"  # its rampart-bootloader.service done
    after = _status(guest)
    assert after["running"] == _info("new"), after  # the firmware started the new loader
    assert after["boot_option"] is not None
    _timed("13 boot loader update", started)

    # A power cut at each step where one copy is missing, alternating the two loaders:
    # the firmware must fall back from the boot option to the removable-media path
    # (main-removed), or boot the main copy without a fallback (fallback-removed). The
    # ESP after a cut at each of the other steps holds two whole copies (checked for
    # every step on the host: tests/device/test_bootloader.py).
    started = time.monotonic()
    previous = "new"
    for number, step in enumerate(CUT_AT):
        staged = "third" if previous == "new" else "new"
        _stage(guest, loaders, staged)
        unit = f"loader-cut-{number}"
        guest.sh(f"systemd-run --unit={unit} rampart bootloader install --halt-at {step}")
        _wait_halted(guest, unit, step)
        guest.power_cut()
        assert guest.boot().core == CORE.format(build.INSTALLED), step
        assert guest.wait_system_up() == "running", step
        found = _status(guest)
        assert found["running"] in (_info(previous), _info(staged)), (step, found)
        # The boot's rampart-bootloader.service finished the install.
        assert found["copies"] == {
            LOADER_PATH: _info(staged),
            FALLBACK_LOADER_PATH: _info(staged),
        }, (step, found)
        assert found["staged"] == {}, (step, found)
        previous = staged
    # That the firmware then starts the loader the last install completed is checked at
    # scenario 14's first boot (a boot saved).
    assert previous == _loader_after_the_cuts()
    assert set(CUT_AT) <= set(bootloader.STEPS)
    _timed("13 power cuts in a boot loader install", started)


@pytest.fixture(scope="module")
def server(bed: build.Testbed, work: Path, guest: session.Guest) -> Iterator[session.UpdateServer]:
    """`rampart serve` for this machine, beside the scenarios process's (another port:
    the guest's remote.toml, on its state partition, is pointed at it)."""
    with session.UpdateServer(bed, work / "server", port=SB_PORT) as srv:
        yield srv


def _resigned_uki(bed: build.Testbed, version: str, keys: secureboot.KeySet, work: Path) -> Path:
    """`version`'s UKI signed with `keys`' db key only (the build's signature removed)."""
    out = work / f"uki-{version}-{keys.directory.name}.efi"
    shutil.copyfile(bed.efiboot(version), out)
    run.run(["sbattach", "--remove", str(out)])  # in place
    uki.sign(out, keys.key("db"), keys.cert("db"))
    return out


def _reboot_unlocked(guest: session.Guest, version: str, why: str) -> None:
    """Reboot; the state partition must open with the TPM (no passphrase prompt)."""
    guest.restart()
    index, _ = guest.vm.expect_any([PROMPT, UNLOCKED_TPM], session.BOOT_TIMEOUT)
    assert index == 1, f"{why}: the boot asked for the recovery passphrase"
    assert guest.wait_booted().core == CORE.format(version), why
    assert guest.wait_system_up() == "running", (why, guest.failed_units())


def _apply(guest: session.Guest) -> tuple[int, dict[str, Any]]:
    done = guest.vm.shell("rampart secureboot apply --json", 300)
    text = done.output
    return done.returncode, json.loads(text[text.find("{") :])


def _efivar_sha(guest: session.Guest, name: str) -> str:
    path = f"/sys/firmware/efi/efivars/{name}-d719b2cb-3d3a-4596-a3bc-dad00e67656f"
    return guest.sh(f"sha256sum {path} 2>/dev/null || echo none").split()[0]


def _records(guest: session.Guest) -> list[dict[str, Any]]:
    text = guest.sh("rampart secureboot status --json")
    found: list[dict[str, Any]] = json.loads(text[text.find("{") :])["updates"]
    return found


def _refused_by_hand(
    guest: session.Guest,
    loaders: dict[str, tuple[int, int, str]],
    name: str,
    staged_as: str,
    result: str,
) -> str:
    """Stage append `name` of the raw disk as `staged_as` and run `secureboot apply`:
    it must exit 11 with the append recorded as `result` and its variable unchanged;
    the reason given."""
    variable = staged_as.rsplit(".", 2)[1]
    before = _efivar_sha(guest, variable)
    _stage(guest, loaders, name, f"{STAGING}/{staged_as}")
    code, done = _apply(guest)
    assert code == 11 and len(done["refused"]) == 1, done
    assert _efivar_sha(guest, variable) == before
    assert _records(guest)[-1]["result"] == result
    reason: str = done["refused"][0]
    return reason


def test_14_secure_boot_key_rotation_and_revocation_never_ask_for_the_passphrase(
    bed: build.Testbed,
    work: Path,
    guest: session.Guest,
    server: session.UpdateServer,
    loaders: dict[str, tuple[int, int, str]],
    rotated: secureboot.KeySet,
) -> None:
    """On the real firmware, after scenario 13 (1.0.0 running, its loader signed with
    the enrolled db key):

    - (issue scenario 5) a db append signed by a KEK the firmware does not hold: the
      firmware rejects it (EACCES), `secureboot apply` exits 11, db is unchanged;
    - (2) 1.0.1, its UKI and its loader signed only with a rotated db key, carries the
      db append adding that key's certificate (signed with the enrolled KEK): the
      update applies it before it installs the UKI; 1.0.1 boots, its loader is
      installed after its good boot, and the state unlocks with the TPM at each boot
      (the predictions held);
    - (4) a dbx append revoking the old db certificate, while 1.0.0 (signed only by it)
      is installed: refused, dbx unchanged;
    - (3) 1.0.2 (rotated key) carries that dbx append: its update removes 1.0.0's entry,
      the append is applied after its good boot, the next boot unlocks with the TPM,
      and the firmware refuses a loader signed with the old key (a boot option for it,
      set as BootNext, is skipped). (1.0.3 is the testbed's broken release.)"""
    started = time.monotonic()
    remote = "/etc/rampart/remote.toml"  # on the state partition: the operator's
    guest.sh(
        f"sed -i 's|:{build.SERVER_PORT}/|:{SB_PORT}/|' {remote} && grep -q :{SB_PORT}/ {remote}"
    )
    running = build.INSTALLED

    # Scenario 5: rejected by the firmware.
    db_before = _efivar_sha(guest, "db")
    reason = _refused_by_hand(guest, loaders, "rejected-db", f"{running}.db.auth", "rejected")
    assert "KEK" in reason, reason
    _timed("14 rejected db append", started)

    # Scenario 2: db rotation in one release. 1.0.1's UKI and loader are signed only
    # with the rotated key; it carries the db append that adds its certificate: the
    # update applies it before it installs the UKI.
    started = time.monotonic()
    db_append = work / "db-add.auth"
    secureboot.signed_append(bed.keys, "db", db_append, certificates=[rotated.cert("db")])
    rotated_loader = build.renamed_loader(work / "rotated.efi", rotated.directory, ROTATED)
    server.publish(
        "1.0.1",
        efiboot=_resigned_uki(bed, "1.0.1", rotated, work),
        loader=rotated_loader,
        sbvars={"db": db_append},
    )
    assert guest.run_update_service() == 20, guest.update_journal()
    assert _records(guest)[-1]["result"] == "applied", _records(guest)
    assert _efivar_sha(guest, "db") != db_before
    _reboot_unlocked(guest, "1.0.1", "the first boot with the new db and a UKI of the new key")
    found = _status(guest)
    # The first boot after scenario 13's power cuts: the firmware started the loader
    # whose interrupted install the last boot completed.
    assert found["running"] == _info(_loader_after_the_cuts()), found
    # The rotated key's loader was installed after this good boot.
    assert found["copies"] == {
        LOADER_PATH: _info_of(ROTATED),
        FALLBACK_LOADER_PATH: _info_of(ROTATED),
    }, found
    sealed = guest.tpm_status()["pcr7_sealed"]
    assert sealed is not None and sealed["predicted"], sealed  # for the new loader
    _timed("14 db rotation", started)

    # Scenario 4: a dbx that would revoke an installed UKI (1.0.0's) is refused.
    started = time.monotonic()
    dbx_before = _efivar_sha(guest, "dbx")
    reason = _refused_by_hand(guest, loaders, "revoke-db", "1.0.1.dbx.auth", "refused")
    assert "clipos-1.0.0" in reason, reason
    _timed("14 refused dbx", started)

    # Scenario 3: the dbx append with 1.0.2, once nothing installed needs the old key
    # (the update removes 1.0.0's entry).
    started = time.monotonic()
    revoke = work / "revoke-db-1.0.2.auth"
    secureboot.signed_append(
        bed.keys, "dbx", revoke, certificates=[secureboot.KeySet(bed.keys).cert("db")]
    )
    server.publish(
        "1.0.2", efiboot=_resigned_uki(bed, "1.0.2", rotated, work), sbvars={"dbx": revoke}
    )
    assert guest.run_update_service() == 20, guest.update_journal()
    _reboot_unlocked(guest, "1.0.2", "the first boot of the new key's loader")
    assert _status(guest)["running"] == _info_of(ROTATED)
    assert _records(guest)[-1]["result"] == "applied", _records(guest)
    assert _efivar_sha(guest, "dbx") != dbx_before
    # A loader signed with the old key, first in line for the next boot.
    _stage(guest, loaders, "new", "/efi/EFI/test/revoked.efi")
    option = boot_next(guest, "Revoked", "EFI/test/revoked.efi")
    _reboot_unlocked(guest, "1.0.2", "the first boot after the dbx append")
    current = guest.sh("efibootmgr | sed -n 's/^BootCurrent: //p'").strip()
    assert current != option, "the firmware started a loader signed with the revoked key"
    assert _status(guest)["running"] == _info_of(ROTATED)
    delete_boot_option(guest, option)
    _timed("14 dbx revocation", started)


def _wait_halted(guest: session.Guest, unit: str, step: str) -> None:
    """Wait for the install under `unit` to stop at `step` (its log line); fail with
    its journal if it ends or does not get there."""
    waited = guest.vm.shell(  # in a subshell: `exit` leaves it, not the login shell
        f"(for i in $(seq 300); do journalctl -u {unit} -o cat | grep -q 'halted at {step}' "
        f"&& exit 0; systemctl -q is-active {unit} || exit 1; sleep 0.2; done; exit 1)",
        120,
    )
    if waited.returncode != 0:
        journal = guest.sh(f"journalctl -u {unit} -o cat --no-pager | tail -20")
        pytest.fail(f"the install did not halt at {step}: {journal}", pytrace=False)


def _timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 1)
