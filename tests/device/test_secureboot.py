"""Secure Boot variable updates (device/secureboot.py): a release's db and dbx appends
staged by the update and applied after its good boot, in order with its boot loader;
a dbx that would revoke an installed loader or UKI refused with the variables
unchanged; an append the firmware rejects recorded; an update whose UKI the firmware
would refuse not installed; and the state key sealed so that it unseals at the
predicted next boot (a real swtpm), never at an unpredicted one.

The firmware's variables are files in a directory standing in for efivarfs
(tests/device/sbkit.py), and SetVariable is `FirmwareStandIn`: it appends what a key
of the enrolled KEK signed, dropping entries db or dbx hold already (edk2's
FilterSignatureList), and refuses with EACCES what another key signed. It judges the
signer by the certificate the PKCS#7 carries and does not verify the signature: the
testbed's OVMF does (tests/testbed/test_boot_chain.py)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rampart.contracts import efivars, pe
from rampart.contracts.layout import LOADER_PATH
from rampart.contracts.version import parse_version
from rampart.device import bootloader, pcr7, state, tpm, update
from rampart.device import secureboot as device_secureboot
from rampart.device.esp import Esp
from rampart.errors import ConflictError, VerificationError
from rampart.release import secureboot, uki, webroot
from rampart.testbed import services
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import OS, DeviceDirs, larger_slots, make_device, make_release
from tests.device.sbkit import (
    OFFERED,
    OWNER,
    Firmware,
    der,
    esp_root,
    sign_entries,
    signed_loader,
    updated_device,
)
from tests.device.test_pcr7 import a_log


class FirmwareStandIn:
    """SetVariable for authenticated appends to db and dbx, as the firmware does it."""

    def __init__(self, kek: bytes) -> None:
        self.kek = kek
        self.writes: list[str] = []

    def write(self, path: Path, data: bytes) -> None:
        name = path.name.split("-", 1)[0]
        write = efivars.parse_authenticated_write(data, name)
        if self.kek not in efivars.signer_certificates(write.pkcs7):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        old = path.read_bytes()[4:] if path.exists() else b""
        new = efivars.appended_bytes(old, write.payload, name)
        path.write_bytes(struct.pack("<I", write.attributes & ~efivars.APPEND_WRITE) + new)
        self.writes.append(name)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    """A second key set: its db certificate is the one a rotation adds; its KEK is not
    enrolled anywhere."""
    return secureboot.generate_keys(tmp_path_factory.mktemp("other") / "keys")


class Machine:
    def __init__(self, device: DeviceDirs, firmware: Firmware, standin: FirmwareStandIn) -> None:
        self.device, self.firmware, self.standin = device, firmware, standin
        self.order: list[str] = []

    @property
    def staging(self) -> Path:
        return self.device.root / "bootloader"

    def esp(self) -> Esp:
        return Esp(self.device.esp, OS)

    def bless(self) -> None:
        assert self.esp().bless(parse_version(OFFERED)) is not None

    def apply(self, seal: device_secureboot.Sealing | None = None) -> device_secureboot.Applied:
        return device_secureboot.apply(
            self.esp(), self.staging, parse_version(OFFERED), self.firmware.efivars, seal
        )

    def variable(self, name: str) -> bytes | None:
        found = efivars.read_variable(self.firmware.efivars, name, efivars.IMAGE_SECURITY_DATABASE)
        return None if found is None else found[1]


MakeMachine = Callable[[dict[str, Path]], Machine]


@pytest.fixture
def machine_with(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    keys: secureboot.KeySet,
    loaders: dict[str, Path],
    bindir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[MakeMachine]:
    """A factory: a device updated to a release carrying the new loader and the given
    appends (files made by `rampart keys db-append|dbx-append`'s code), its UKIs signed
    with the db key, its firmware holding that key's certificate in db."""

    def make(sbvars: dict[str, Path]) -> Machine:
        device = updated_device(tmp_path, vendor, pki, served, loaders, sbvars)
        sign_entries(device, keys)
        firmware = Firmware(device, keys, bindir)
        standin = FirmwareStandIn(der(keys, "KEK"))
        monkeypatch.setattr(device_secureboot, "write_efivar", standin.write)
        machine = Machine(device, firmware, standin)
        install = bootloader.install

        def ordered(*args: object, **kwargs: object) -> bootloader.Installed | None:
            machine.order.append("loader")
            return install(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(bootloader, "install", ordered)
        original = standin.write

        def noted(path: Path, data: bytes) -> None:
            machine.order.append(path.name.split("-", 1)[0])
            original(path, data)

        monkeypatch.setattr(device_secureboot, "write_efivar", noted)
        return machine

    yield make


def records(machine: Machine) -> list[dict[str, Any]]:
    """The updates `secureboot status` shows."""
    updates = device_secureboot.status(machine.staging)["updates"]
    assert isinstance(updates, list)
    return updates


def append(
    tmp_path: Path, keys: secureboot.KeySet, variable: str, name: str, **kw: list[Path]
) -> Path:
    out = tmp_path / f"{name}.auth"
    secureboot.signed_append(keys.directory, variable, out, **kw)
    return out


def test_db_and_dbx_appends_are_staged_then_applied_with_the_loader_between_them(
    tmp_path: Path,
    machine_with: MakeMachine,
    keys: secureboot.KeySet,
    other: secureboot.KeySet,
    loaders: dict[str, Path],
) -> None:
    """The release adds the other db certificate and revokes the old loader's hash:
    after the good boot db grows, the new loader replaces the old one, then dbx
    revokes the old one (which, before the loader was replaced, was the fallback copy:
    that order is what lets this dbx through)."""
    db_auth = append(tmp_path, keys, "db", "db-add", certificates=[other.cert("db")])
    dbx_auth = append(tmp_path, keys, "dbx", "dbx-old-loader", images=[loaders["old"]])
    machine = machine_with({"db": db_auth, "dbx": dbx_auth})
    staged = sorted(p.name for p in machine.staging.glob("*.auth"))
    assert staged == [f"{OFFERED}.db.auth", f"{OFFERED}.dbx.auth"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in machine.staging.glob("*.auth"))
    db_before = machine.variable("db")
    with pytest.raises(ConflictError, match="not marked good yet"):
        machine.apply()
    assert machine.order == [] and machine.variable("db") == db_before
    machine.bless()

    done = machine.apply()

    assert machine.order == ["db", "loader", "dbx"]
    assert done.applied == ["db", "dbx"] and done.refused == []
    assert done.loader is not None and done.loader.version == "systemd-boot 252.99-1~deb12u2"
    db = efivars.parse_signature_lists(machine.variable("db") or b"", "db")
    assert efivars.x509_certificates(db) == [der(keys, "db"), der(other, "db")]
    dbx = efivars.parse_signature_lists(machine.variable("dbx") or b"", "dbx")
    assert [s.data for s in dbx] == [pe.authenticode_sha256(loaders["old"].read_bytes())]
    found = device_secureboot.status(machine.staging)
    assert [(u["variable"], u["result"]) for u in records(machine)] == [
        ("db", "applied"),
        ("dbx", "applied"),
    ]
    assert found["staged"] == []
    text = device_secureboot.render_status(found)
    assert (
        f"db append of {OFFERED}: applied" in text and f"dbx append of {OFFERED}: applied" in text
    )
    machine.order.clear()
    again = machine.apply()
    assert again.applied == [] and machine.order == ["loader"]  # each update applied once


@pytest.mark.parametrize("revoked", ["the db certificate", "the running UKI's hash"])
def test_dbx_that_would_revoke_what_boots_is_refused_with_the_variables_unchanged(
    tmp_path: Path,
    machine_with: MakeMachine,
    keys: secureboot.KeySet,
    revoked: str,
) -> None:
    """A dbx append that would make the firmware refuse the loader and every UKI (the
    certificate that signs them), or the running version's UKI (its hash), is not
    written; the record and the error name the images. The loader is still
    installed: it boots with db and dbx as they stay."""
    if revoked == "the db certificate":
        dbx_auth = append(tmp_path, keys, "dbx", "dbx-db", certificates=[keys.cert("db")])
        machine = machine_with({"dbx": dbx_auth})
    else:  # the UKI is signed once the device is made: its hash is known then
        machine = machine_with({})
        entry = machine.esp().find(parse_version(OFFERED))
        assert entry is not None
        dbx_auth = append(tmp_path, keys, "dbx", "dbx-uki", images=[entry.path])
        staged = device_secureboot.staged_path(machine.staging, parse_version(OFFERED), "dbx")
        staged.write_bytes(dbx_auth.read_bytes())  # as the update stages it
    machine.bless()
    dbx_before = machine.variable("dbx")

    done = machine.apply()

    assert machine.order == ["loader"] and machine.variable("dbx") == dbx_before
    assert done.applied == [] and len(done.refused) == 1
    assert f"{OS}-{OFFERED}.efi" in done.refused[0]
    if revoked == "the db certificate":
        assert LOADER_PATH in done.refused[0] or "staged boot loader" in done.refused[0]
        assert "dbx revokes the certificate of its signature" in done.refused[0]
    else:
        assert "dbx revokes its image hash" in done.refused[0]
    (update_record,) = records(machine)
    assert update_record["result"] == "refused"
    assert not list(machine.staging.glob("*.auth"))


def test_an_append_not_signed_by_the_enrolled_kek_is_rejected_by_the_firmware_and_recorded(
    tmp_path: Path,
    machine_with: MakeMachine,
    other: secureboot.KeySet,
) -> None:
    """Scenario 5 on the host: the firmware (here its stand-in) refuses the write with
    EACCES; db is unchanged, the rejection recorded, the loader installed."""
    db_auth = append(tmp_path, other, "db", "db-other-kek", certificates=[other.cert("db")])
    machine = machine_with({"db": db_auth})
    machine.bless()
    db_before = machine.variable("db")

    done = machine.apply()

    assert machine.variable("db") == db_before
    assert done.applied == [] and "rejected" in done.refused[0] and "KEK" in done.refused[0]
    assert machine.order == ["db", "loader"]
    (update_record,) = records(machine)
    assert update_record["result"] == "rejected"


def test_an_update_whose_uki_the_firmware_would_refuse_is_not_installed_until_db_holds_its_key(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    keys: secureboot.KeySet,
    other: secureboot.KeySet,
    bindir: Path,
) -> None:
    """A release signed only with a db key this firmware does not hold yet would not
    boot: with Secure Boot on, the update refuses it before anything changes. Once db
    holds that key's certificate (a db append of an earlier release), it installs."""
    release = make_release(tmp_path / "rel", OFFERED)
    uki.sign(release.efiboot, other.key("db"), other.cert("db"))
    webroot.publish(
        served.root, OS, parse_version(OFFERED), release.core, release.efiboot, vendor.key
    )
    device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url))
    firmware = Firmware(device, keys, bindir)
    firmware.secure_boot_on()
    before = device.state()
    dev = device.open()
    with pytest.raises(VerificationError, match="verifies with none of the 1 certificates"):
        update.update(dev, update.make_fetcher(dev))
    assert device.state() == before

    firmware.db(der(keys, "db"), der(other, "db"))
    dev = device.open()
    assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED


# --- PCR 7 -----------------------------------------------------------------------------


def _boot(chip: tpm.Tpm, log: Path) -> None:
    """What the firmware does at a boot: extend PCR 7 with the log's events."""
    for event in pcr7.read_log(log):
        chip._tool("tpm2_pcrextend", f"7:sha256={event.digest.hex()}")


def test_the_state_key_unseals_at_the_predicted_boot_after_a_db_append_and_not_at_another(
    tmp_path: Path,
    machine_with: MakeMachine,
    keys: secureboot.KeySet,
    other: secureboot.KeySet,
) -> None:
    """With a real swtpm: the key is sealed to PCR 7 as this boot's log makes it.
    Before the db append is written, `apply` seals the same key to PCR 7 now and as
    predicted for the next boot; that boot (the firmware's log with the new db) unseals
    it with no passphrase, a boot with another db does not (the passphrase, never an
    unlocked disk). After that good boot, `apply` drops the old value."""
    db_auth = append(tmp_path, keys, "db", "db-add", certificates=[other.cert("db")])
    machine = machine_with({"db": db_auth})
    machine.bless()
    machine.firmware.secure_boot_on()
    authority = pcr7.signature_data(OWNER, der(keys, "db"))  # verifies the loader and UKIs
    log_now = tmp_path / "log-now"
    root = esp_root(machine.device)
    key = os.urandom(32)
    with services.Swtpm(tmp_path / "tpm") as swtpm:
        chip = swtpm.tpm
        now = a_log(log_now, machine.variable("db") or b"", authority, dbx=b"")
        _boot(chip, log_now)
        assert chip.pcr_values([7])[7] == now
        state.seal_to_esp(chip, key, root, [7])
        seal = device_secureboot.Sealing(chip, root, (7,), event_log=log_now)

        done = machine.apply(seal)

        assert done.applied == ["db"] and done.resealed
        sealed = device_secureboot.read_record(machine.staging)["sealed"]
        assert isinstance(sealed, dict)
        log_next = tmp_path / "log-next"
        predicted = a_log(log_next, machine.variable("db") or b"", authority, dbx=b"")
        assert sealed["pcr7"] == [now.hex(), predicted.hex()]
        assert len(state.sealed_branches(root)) == 2
    pub, priv, _ = state.sealed_paths(root)
    with services.Swtpm(tmp_path / "tpm") as swtpm:  # the next boot: PCRs from zero
        chip = swtpm.tpm
        _boot(chip, log_next)
        assert chip.unseal(pub, priv, [7], state.sealed_branches(root)) == key
        seal = device_secureboot.Sealing(chip, root, (7,), event_log=log_next)
        again = machine.apply(seal)  # the good boot's apply: only this value now
        assert again.resealed and state.sealed_branches(root) == []
        record = device_secureboot.read_record(machine.staging)["sealed"]
        assert isinstance(record, dict) and record["pcr7"] == [predicted.hex()]
        assert chip.unseal(pub, priv, [7]) == key
    with services.Swtpm(tmp_path / "tpm") as swtpm:  # a boot nobody predicted
        chip = swtpm.tpm
        a_log(tmp_path / "log-other", b"another db", authority, dbx=b"")
        _boot(chip, tmp_path / "log-other")
        with pytest.raises(tpm.TpmPolicyError):
            chip.unseal(pub, priv, [7])


def test_the_prediction_holds_once_the_loader_that_started_this_boot_was_replaced(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    keys: secureboot.KeySet,
    other: secureboot.KeySet,
    bindir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by testbed scenario 14: the release's loader, signed by another db key,
    was installed after this boot's good start; a dbx append applied later in the
    same boot found no loader on the ESP that explains this boot's log, and predicted
    the next boot with the logged authority (the old loader's): the next boot asked
    for the passphrase. The model now also accepts a log whose last authority is the
    running UKI's entry, and predicts the new loader's entry."""
    loaders = {
        "old": signed_loader(tmp_path, keys, "252.38-1~deb12u2"),
        "new": signed_loader(tmp_path, other, "252.96-1~deb12u2"),
    }
    device = updated_device(tmp_path, vendor, pki, served, loaders)
    sign_entries(device, keys)
    firmware = Firmware(device, keys, bindir)
    firmware.db(der(keys, "db"), der(other, "db"))
    firmware.secure_boot_on()
    standin = FirmwareStandIn(der(keys, "KEK"))
    monkeypatch.setattr(device_secureboot, "write_efivar", standin.write)
    machine = Machine(device, firmware, standin)
    machine.bless()
    keys_entry = pcr7.signature_data(OWNER, der(keys, "db"))
    other_entry = pcr7.signature_data(OWNER, der(other, "db"))
    root = esp_root(device)
    key = os.urandom(32)
    log_now = tmp_path / "log-now"
    with services.Swtpm(tmp_path / "tpm") as swtpm:
        chip = swtpm.tpm
        a_log(log_now, machine.variable("db") or b"", keys_entry, dbx=b"")
        _boot(chip, log_now)
        state.seal_to_esp(chip, key, root, [7])
        seal = device_secureboot.Sealing(chip, root, (7,), event_log=log_now)
        assert machine.apply(seal).loader is not None  # the other key's loader, both copies
        # Later in the same boot, a dbx append (revoking the old loader, gone now).
        dbx_auth = append(tmp_path, keys, "dbx", "dbx-old", images=[loaders["old"]])
        staged = device_secureboot.staged_path(machine.staging, parse_version(OFFERED), "dbx")
        staged.write_bytes(dbx_auth.read_bytes())
        assert machine.apply(seal).applied == ["dbx"]
        log_next = tmp_path / "log-next"
        db = machine.variable("db") or b""
        a_log(log_next, db, [other_entry, keys_entry], dbx=machine.variable("dbx") or b"")
    pub, priv, _ = state.sealed_paths(root)
    with services.Swtpm(tmp_path / "tpm") as swtpm:  # the next boot: the new loader
        _boot(swtpm.tpm, log_next)
        assert swtpm.tpm.unseal(pub, priv, [7], state.sealed_branches(root)) == key


def test_a_release_signed_by_a_new_key_with_its_db_append_applies_it_before_its_uki(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    keys: secureboot.KeySet,
    other: secureboot.KeySet,
    bindir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rotation in one release: its UKI is signed only with the new db key and it
    carries the db append that adds that key's certificate. The update applies the
    append first (recorded for the release), then installs the UKI; after the good
    boot there is nothing left to apply."""
    release = make_release(tmp_path / "rel", OFFERED)
    uki.sign(release.efiboot, other.key("db"), other.cert("db"))
    db_auth = append(tmp_path, keys, "db", "db-add", certificates=[other.cert("db")])
    webroot.publish(
        served.root, OS, parse_version(OFFERED), release.core, release.efiboot, vendor.key,
        sbvars={"db": db_auth},
    )  # fmt: skip
    device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url))
    firmware = Firmware(device, keys, bindir)
    firmware.secure_boot_on()
    standin = FirmwareStandIn(der(keys, "KEK"))
    monkeypatch.setattr(device_secureboot, "write_efivar", standin.write)
    dev = device.open()

    assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED

    assert standin.writes == ["db"]
    machine = Machine(device, firmware, standin)
    db = efivars.parse_signature_lists(machine.variable("db") or b"", "db")
    assert efivars.x509_certificates(db) == [der(keys, "db"), der(other, "db")]
    assert [(u["variable"], u["version"], u["result"]) for u in records(machine)] == [
        ("db", OFFERED, "applied")
    ]
    device.set_running(OFFERED)  # its good boot (no boot counting on this device)
    assert machine.apply().applied == [] and standin.writes == ["db"]
