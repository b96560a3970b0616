"""Smoke boot under Secure Boot: OVMF (secboot build, SMM) with our PK/KEK/db enrolled
boots systemd-boot and a UKI signed with db, and refuses a UKI that db did not sign.

TCG only (KVM hangs on this machine); each boot is bounded. The guest is the
Debian kernel with a busybox initramfs whose /init prints a marker and powers off.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rampart.contracts.cmdline import kernel_cmdline
from rampart.release import secureboot, uki
from tests.release import bootkit

pytestmark = pytest.mark.vm

VERSION = "1.0.0"
BOOT_TIMEOUT = 180.0  # TCG boots in 10-20 s here; a stuck boot ends the test
REFUSAL = ("Access Denied", "Security Violation")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("secureboot-vm")
    keys = secureboot.generate_keys(work / "keys")
    other = secureboot.generate_keys(work / "other-keys", "Intruder")
    vars_file = secureboot.ovmf_vars(keys.directory, work / "OVMF_VARS.fd")
    initrd = bootkit.busybox_initrd(work / "initrd.cpio")
    return {
        "work": work,
        "keys": keys.directory,
        "other": other.directory,
        "vars": vars_file,
        "initrd": initrd,
    }


def _uki(rig: dict[str, Path], name: str, signer: Path | None) -> Path:
    out_dir = rig["work"] / name
    out_dir.mkdir()
    cmdline = kernel_cmdline(
        "mainvg",
        VERSION,
        roothash="ab" * 32,
        hash_offset=40960,
        data_blocks=10,
        extra=["console=ttyS0"],
    )
    keys = None if signer is None else secureboot.KeySet(signer)
    return uki.build(
        out_dir / f"clipos-{VERSION}.efi",
        kernel=bootkit.kernel(),
        initrd=rig["initrd"],
        os_name="clipos",
        version=VERSION,
        cmdline=cmdline,
        sign_key=None if keys is None else keys.key("db"),
        sign_cert=None if keys is None else keys.cert("db"),
    ).path


def _boot(rig: dict[str, Path], name: str, image: Path, stop_on: tuple[str, ...]) -> bootkit.Boot:
    esp = secureboot.build_esp(
        rig["work"] / name / "esp", rig["keys"], [image], require_signed=False
    )
    run_dir = rig["work"] / name / "run"
    run_dir.mkdir()
    result = bootkit.boot(run_dir, esp, rig["vars"], BOOT_TIMEOUT, stop_on=stop_on)
    print(f"\n{name}: {result.seconds:.1f} s, guest powered off: {result.exited}")
    return result


def _plain(console: str) -> str:
    return re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", " ", console).replace("\r", "")


def test_signed_uki_boots_under_secure_boot(rig: dict[str, Path]) -> None:
    image = _uki(rig, "signed", rig["keys"])
    result = _boot(rig, "signed", image, stop_on=REFUSAL)
    console = _plain(result.console)
    assert bootkit.MARKER in console, console[-3000:]
    assert result.exited, "the guest did not power off"
    assert "EFI stub: UEFI Secure Boot is enabled." in console
    assert "secureboot: Secure boot enabled" in console
    assert "RAMPART-LOCKDOWN:none integrity [confidentiality]" in console
    # The command line the kernel ran with is the one the signed UKI carries.
    ran = re.search(r"RAMPART-CMDLINE:(.*)", console)
    assert ran is not None
    assert ran.group(1).strip() == uki.inspect(image).cmdline
    # The firmware trusted our db certificate, not a default one.
    assert "Loaded X.509 cert 'Rampart db" in console


@pytest.mark.parametrize("signer", ["unsigned", "unenrolled-key"])
def test_uki_not_signed_by_db_is_refused(rig: dict[str, Path], signer: str) -> None:
    image = _uki(rig, signer, None if signer == "unsigned" else rig["other"])
    result = _boot(rig, signer, image, stop_on=(*REFUSAL, bootkit.MARKER))
    console = _plain(result.console)
    assert bootkit.MARKER not in console
    assert "Linux version" not in console
    assert re.search(
        rf"Error loading \\EFI\\Linux\\clipos-{re.escape(VERSION)}\.efi: "
        r"(Access Denied|Security Violation)",
        console,
    ), console[-3000:]
