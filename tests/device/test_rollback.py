"""Offline-rollback protection on the device, with a real swtpm: `mark-good` raises the
TPM's rollback counter to the lowest epoch among the installed, bootable versions
(never above it, never down); `update` refuses a release whose epoch is below the
counter or below the running version's; `status` shows both."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rampart.contracts import cmdline
from rampart.device import config as device_config
from rampart.device import rollback, status, tpm, update
from rampart.device.esp import Esp
from rampart.device.slots import open_backend
from rampart.errors import FormatError, LocalError, VerificationError
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair, fake_uki, run_cli, tcti_of
from tests.device.conftest import OS, DeviceDirs, Release, make_device, make_release, publish

RUNNING = "5.0.0-alpha.1"
OFFERED = "5.0.0-alpha.3"


def tpm_config(tcti: str, required: bool = False) -> str:
    return f'\n[tpm]\ntcti = "{tcti}"\nrequired = {"true" if required else "false"}\n'


def uki_file(path: Path, epoch: int | None) -> Path:
    extra = "" if epoch is None else f" rampart.epoch={epoch}"
    path.write_bytes(fake_uki(f"root=/dev/mapper/verity_core_x ro{extra} quiet"))
    return path


def local_device(tmp_path: Path, vendor: KeyPair, extra_config: str = "") -> DeviceDirs:
    """A device for the verbs that never reach the server (mark-good, status)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca = tmp_path / "unused-ca.pem"
    ca.write_text("unused\n")
    url = "https://localhost:1"
    return make_device(tmp_path / "device", vendor, ca, url, RUNNING, extra_config)


def install(device: DeviceDirs, version: str, epoch: int | None, entry: str = "") -> None:
    """An installed version: its Core slot and its boot entry (`entry`: another name)."""
    (device.vg / f"core_{version}").write_bytes(bytes(1 << 20))
    uki_file(device.esp / (entry or f"{OS}-{version}.efi"), epoch)


def mark_good(device: DeviceDirs, *extra: str) -> tuple[int, str, str]:
    argv = device.argv()
    result = run_cli("mark-good", *argv[:2], *argv[6:], *extra)
    return result.code, result.out, result.err


# --- reading epochs ----------------------------------------------------------------------


def test_epochs_are_read_from_the_command_line(tmp_path: Path) -> None:
    assert cmdline.cmdline_epoch("root=x rampart.epoch=7 quiet", "x") == 7
    assert cmdline.cmdline_epoch("rampart.epoch=1 rampart.epoch=4", "x") == 4  # the kernel's rule
    assert cmdline.cmdline_epoch("root=x quiet", "x") == 0
    assert cmdline.cmdline_epoch(None, "x") == 0
    assert cmdline.cmdline_epoch(f"rampart.epoch={cmdline.MAX_EPOCH}", "x") == cmdline.MAX_EPOCH
    for bad in ("rampart.epoch=", "rampart.epoch=-1", "rampart.epoch=x1", "rampart.epoch=0x10"):
        with pytest.raises(FormatError, match="is not a security epoch"):
            cmdline.cmdline_epoch(bad, "x")
    with pytest.raises(FormatError):
        cmdline.cmdline_epoch(f"rampart.epoch={cmdline.MAX_EPOCH + 1}", "x")
    assert rollback.uki_epoch(uki_file(tmp_path / "a.efi", 3)) == 3
    assert rollback.uki_epoch(uki_file(tmp_path / "b.efi", None)) == 0
    (tmp_path / "c.efi").write_bytes(b"MZ not a PE file")
    assert rollback.uki_epoch(tmp_path / "c.efi") == 0  # an EFI binary Rampart did not build
    proc = tmp_path / "cmdline"
    proc.write_text("BOOT_IMAGE=/x root=/dev/mapper/verity_core_1 rampart.epoch=5 quiet\n")
    assert rollback.running_epoch(proc) == 5
    proc.write_text("BOOT_IMAGE=/x quiet\n")
    assert rollback.running_epoch(proc) == 0
    with pytest.raises(LocalError, match="cannot read the kernel command line"):
        rollback.running_epoch(tmp_path / "missing")


def test_bootable_versions_have_an_entry_with_tries_left_and_a_slot(
    tmp_path: Path, vendor: KeyPair
) -> None:
    device = local_device(tmp_path, vendor)
    uki_file(device.esp / f"{OS}-{RUNNING}.efi", 2)
    install(device, "5.0.0-alpha.2", 1, f"{OS}-5.0.0-alpha.2+0-3.efi")  # bad: out of tries
    install(device, "5.0.0-alpha.3", 4, f"{OS}-5.0.0-alpha.3+2-1.efi")  # being tried
    uki_file(device.esp / f"{OS}-5.0.0-alpha.4.efi", 0)  # no slot: not bootable
    (device.vg / "core_5.0.0-alpha.5").write_bytes(bytes(1 << 20))  # no entry
    config = device_config.load_device_config(device.config_dir)
    found = rollback.bootable(Esp(device.esp, OS), open_backend(config))
    assert [(str(i.version), i.epoch) for i in found] == [(RUNNING, 2), ("5.0.0-alpha.3", 4)]


# --- mark-good ---------------------------------------------------------------------------


def test_mark_good_raises_the_counter_to_the_lowest_bootable_epoch(
    tmp_path: Path, vendor: KeyPair, chip: tpm.Tpm
) -> None:
    device = local_device(tmp_path, vendor, tpm_config(tcti_of(chip)))
    uki_file(device.esp / f"{OS}-{RUNNING}.efi", 1)
    install(device, OFFERED, 3, f"{OS}-{OFFERED}+2-1.efi")
    install(device, "5.0.0-alpha.2", 0, f"{OS}-5.0.0-alpha.2+0-3.efi")  # failed: ignored
    device.set_running(OFFERED)

    # Blessed, and the counter goes to 1, not 3: the fallback (alpha.1) stays bootable.
    code, out, err = mark_good(device, "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "version": OFFERED,
        "entry": f"{OS}-{OFFERED}.efi",
        "rollback_counter": 1,
    }
    assert chip.counter() == 1

    # The fallback is gone (the next update removed its entry): the counter follows.
    (device.esp / f"{OS}-{RUNNING}.efi").unlink()
    code, out, err = mark_good(device)
    assert code == 0, err
    assert out.splitlines() == [
        f"{OFFERED}: boot entry has no counter; already marked good",
        "rollback counter: 3",
    ]
    assert chip.counter() == 3

    # An older epoch installed again never lowers it.
    install(device, "5.0.0-alpha.0", 2)
    code, out, err = mark_good(device, "--json")
    assert code == 0, err
    assert json.loads(out)["rollback_counter"] == 3
    assert chip.counter() == 3


def test_mark_good_leaves_a_fresh_counter_alone_at_epoch_0(
    tmp_path: Path, vendor: KeyPair, chip: tpm.Tpm
) -> None:
    # A TPM counter's first increment makes it at least 1: that would lock out epoch 0.
    device = local_device(tmp_path, vendor, tpm_config(tcti_of(chip)))
    code, out, err = mark_good(device, "--json")
    assert code == 0, err
    assert json.loads(out)["rollback_counter"] == 0
    assert chip.counter() is None


def test_mark_good_without_a_tpm_changes_nothing(tmp_path: Path, vendor: KeyPair) -> None:
    device = local_device(tmp_path, vendor, tpm_config("device:/nonexistent/tpmrm0"))
    uki_file(device.esp / f"{OS}-{RUNNING}.efi", 5)
    code, out, err = mark_good(device, "--json")
    assert code == 0, err
    assert json.loads(out) == {"version": RUNNING, "entry": None, "rollback_counter": None}
    code, out, err = mark_good(device)
    assert code == 0, err
    assert (
        out.splitlines()[-1] == "rollback counter: none (no TPM on this machine); nothing changes"
    )


def test_a_tpm_failure_after_blessing_says_the_entry_was_blessed(
    tmp_path: Path, vendor: KeyPair
) -> None:
    from rampart.testbed.services import free_port

    dead = f"swtpm:host=127.0.0.1,port={free_port()}"  # nothing listens there
    device = local_device(tmp_path, vendor, tpm_config(dead))
    (device.esp / f"{OS}-{RUNNING}.efi").unlink()
    uki_file(device.esp / f"{OS}-{RUNNING}+1-2.efi", 2)
    code, _out, err = mark_good(device)
    assert code == 3
    assert f"{RUNNING}: boot entry blessed, but the rollback counter could not be advanced: " in err
    assert device.entries() == [f"{OS}-{RUNNING}.efi"]  # the blessing stays
    argv = device.argv()
    shown = run_cli("status", *argv[:2], *argv[6:], "--json")
    assert shown.code == 0, shown.err
    report = json.loads(shown.out)
    assert report["rollback_counter"] is None  # unreadable is not 0
    assert "tpm2_getcap failed" in report["rollback_counter_error"]

    # [tpm] required on a machine without one: the same, after blessing.
    device = local_device(tmp_path / "2", vendor, tpm_config("device:/nonexistent/tpm", True))
    code, _out, err = mark_good(device)
    assert code == 3
    assert "could not be advanced: " in err and "no TPM on this machine" in err


# --- status ------------------------------------------------------------------------------


def test_status_shows_the_running_epoch_and_the_counter(
    tmp_path: Path, vendor: KeyPair, chip: tpm.Tpm
) -> None:
    device = local_device(tmp_path, vendor, tpm_config(tcti_of(chip)))
    chip.advance_counter(2)
    proc = tmp_path / "cmdline"
    proc.write_text("root=/dev/mapper/verity_core_5 rampart.epoch=3 quiet\n")
    config = device_config.load_device_config(device.config_dir)
    identity = device_config.load_identity(device.os_release, device.machine_id)
    report = status.collect(config, identity, device.run_dir, proc)
    assert (report["running_epoch"], report["rollback_counter"]) == (3, 2)
    lines = status.render(report).splitlines()
    assert "security epoch: 3" in lines and "rollback counter: 2" in lines

    argv = device.argv()
    result = run_cli("status", *argv[:2], *argv[6:], "--json")
    assert result.code == 0, result.err
    shown = json.loads(result.out)
    assert shown["rollback_counter"] == 2
    assert isinstance(shown["running_epoch"], int)  # this host's /proc/cmdline

    bare = local_device(tmp_path / "2", vendor, tpm_config("device:/nonexistent/tpmrm0"))
    config = device_config.load_device_config(bare.config_dir)
    report = status.collect(config, identity, bare.run_dir, proc)
    assert report["rollback_counter"] is None
    assert "rollback counter: none (no TPM)" in status.render(report).splitlines()


# --- update ------------------------------------------------------------------------------


def epoch_release(tmp_path: Path, version: str, epoch: int | None) -> Release:
    return make_release(tmp_path / f"rel-{version}", version, epoch=epoch)


@pytest.fixture
def device(tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, chip: tpm.Tpm) -> DeviceDirs:
    return make_device(
        tmp_path / "device",
        vendor,
        pki.ca.cert,
        served.url,
        extra_config=tpm_config(tcti_of(chip)),
    )


def test_update_below_the_rollback_counter_is_refused(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs, chip: tpm.Tpm
) -> None:
    publish(served.root, vendor, epoch_release(tmp_path, OFFERED, 1))
    chip.advance_counter(2)
    before = device.state()
    result = run_cli("update", *device.argv())
    assert result.code == VerificationError.exit_code == 11
    assert (
        f"release {OFFERED} has security epoch 1, below this machine's rollback counter 2: "
        "refusing to install it" in result.err
    )
    assert device.state() == before  # neither the ESP nor a slot was touched
    assert served.logged("POST /update/v1/clipos/report")  # reported as a failure

    # The same through the library, with the TPM injected.
    dev = device.open()
    dev.tpm = chip
    with pytest.raises(VerificationError, match="below this machine's rollback counter 2"):
        update.update(dev, update.make_fetcher(dev))
    assert device.state() == before
    assert chip.counter() == 2


def test_update_below_the_running_epoch_is_refused(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    publish(served.root, vendor, epoch_release(tmp_path, OFFERED, 2))
    proc = tmp_path / "cmdline"
    proc.write_text(f"root=/dev/mapper/verity_core_{RUNNING} rampart.epoch=3 quiet\n")
    before = device.state()
    dev = device.open()
    dev.tpm, dev.proc_cmdline = None, proc  # no TPM: the running epoch still counts
    with pytest.raises(VerificationError) as caught:
        update.update(dev, update.make_fetcher(dev))
    assert str(caught.value) == (
        f"release {OFFERED} has security epoch 2, below the running version's epoch 3: "
        "refusing to install it"
    )
    assert device.state() == before


def test_update_at_or_above_both_epochs_installs(
    tmp_path: Path,
    vendor: KeyPair,
    served: Nginx,
    device: DeviceDirs,
    chip: tpm.Tpm,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = epoch_release(tmp_path, OFFERED, 2)
    publish(served.root, vendor, release)
    chip.advance_counter(2)
    proc = tmp_path / "cmdline"
    proc.write_text("rampart.epoch=2\n")
    dev = device.open()
    dev.proc_cmdline = proc  # the TPM comes from [tpm] tcti
    with caplog.at_level(logging.INFO, logger="rampart"):
        result = update.update(dev, update.make_fetcher(dev))
    assert result.outcome == update.Outcome.UPDATED
    assert f"{OFFERED} has security epoch 2 (running epoch 2, rollback counter 2)" in caplog.text
    assert (device.esp / f"{OS}-{OFFERED}.efi").read_bytes() == release.efiboot.read_bytes()
    assert chip.counter() == 2  # update never moves the counter: mark-good does

    # Above both: the next release, epoch 5, with the counter at 2 and running epoch 2.
    (device.run_dir / "update-ready").unlink()
    publish(served.root, vendor, epoch_release(tmp_path, "5.0.0-alpha.4", 5))
    dev = device.open()
    dev.proc_cmdline = proc
    assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED


def test_a_required_tpm_that_is_missing_fails_the_update_before_the_disk(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    publish(served.root, vendor, epoch_release(tmp_path, OFFERED, 1))
    device = make_device(
        tmp_path / "dev",
        vendor,
        pki.ca.cert,
        served.url,
        extra_config=tpm_config("device:/nonexistent/tpmrm0", True),
    )
    before = device.state()
    result = run_cli("update", *device.argv())
    assert result.code == 3, result.err
    assert "no TPM on this machine, and [tpm] required" in result.err
    assert device.state() == before


def test_an_unreachable_tpm_fails_the_update_before_the_disk(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    from rampart.testbed.services import free_port

    publish(served.root, vendor, epoch_release(tmp_path, OFFERED, 3))
    before = device.state()
    dev = device.open()
    dev.tpm = tpm.Tpm(f"swtpm:host=127.0.0.1,port={free_port()}")  # nothing listens there
    with pytest.raises(LocalError, match="tpm2_getcap failed"):
        update.update(dev, update.make_fetcher(dev))
    assert device.state() == before
