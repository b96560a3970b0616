"""Attacks on the update client. Each test is named after the attack, asserts the
error, and asserts that neither the slots nor the ESP changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rampart.device import update
from rampart.errors import FormatError, RemoteDataError, TransportError, VerificationError
from rampart.testbed.services import Pki
from tests.conftest import KeyPair, make_keypair
from tests.device.conftest import OS, DeviceDirs, make_device, make_release, publish
from tests.device.hostile import Behaviour, body, endless, hostile_server, trickle

OFFERED = "5.0.0-alpha.3"
VERSION_PATH = f"/update/v1/{OS}/version"
CORE_PATH = f"/dist/{OFFERED}/{OS}-core"


def attack(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    webroot_dir: Path,
    behaviours: dict[str, Behaviour],
    exception: type[Exception],
    match: str,
    extra_config: str = "",
) -> DeviceDirs:
    """Run one update against the hostile server; assert it fails and changes nothing."""
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, behaviours) as url:
        device = make_device(
            tmp_path / "device", vendor, pki.ca.cert, url, extra_config=extra_config
        )
        before = device.state()
        dev = device.open()
        with pytest.raises(exception, match=match):
            update.update(dev, update.make_fetcher(dev))
        assert device.state() == before
        assert not (device.run_dir / "update-ready").exists()
    return device


def test_payload_signed_by_another_key(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    attacker = make_keypair(tmp_path / "attacker", "attacker")
    publish(webroot_dir, attacker, make_release(tmp_path / "rel", OFFERED))
    attack(tmp_path, vendor, pki, webroot_dir, {}, VerificationError, "signed by key")


def test_replayed_old_payload_under_a_new_version(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    """The attacker serves alpha.2's validly signed files as alpha.3."""
    publish(webroot_dir, vendor, make_release(tmp_path / "old", "5.0.0-alpha.2"))
    new = webroot_dir / "dist" / OFFERED
    shutil.copytree(webroot_dir / "dist/5.0.0-alpha.2", new)
    (webroot_dir / f"update/v1/{OS}/version").write_text(f'version = "{OFFERED}"\n')
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {},
        VerificationError,
        "signed for version '5.0.0-alpha.2'",
    )


def test_mix_and_match_core_and_efiboot_of_different_versions(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "a2", "5.0.0-alpha.2"))
    publish(webroot_dir, vendor, make_release(tmp_path / "a3", OFFERED))
    for name in (f"{OS}-core", f"{OS}-core.sig"):
        shutil.copy(
            webroot_dir / "dist/5.0.0-alpha.2" / name, webroot_dir / "dist" / OFFERED / name
        )
    attack(tmp_path, vendor, pki, webroot_dir, {}, VerificationError, "clipos-5.0.0-alpha.3-core")


@pytest.mark.parametrize("offered", ["5.0.0-alpha.0", "5.0.0-alpha.1"])
def test_server_offering_an_older_or_equal_version(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, offered: str
) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", offered))
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, {}) as url:
        device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
        before = device.state()
        dev = device.open()
        result = update.update(dev, update.make_fetcher(dev))
        assert result.outcome == update.Outcome.UP_TO_DATE
        assert device.state() == before


def test_endless_data(tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {CORE_PATH: endless},
        RemoteDataError,
        "exceeds the cap",
        extra_config='max_core_size = "4M"\n',
    )


def test_payload_announced_larger_than_the_cap(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {},
        RemoteDataError,
        "the cap is 100000",
        extra_config="max_core_size = 100000\n",
    )


def test_payload_shorter_than_announced(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    truncated = (webroot_dir / CORE_PATH.lstrip("/")).read_bytes()[:1000]
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {CORE_PATH: body(truncated, 300_000)},
        TransportError,
        "connection closed after 1000 of 300000 bytes",
    )


def test_slow_retrieval(tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path) -> None:
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {CORE_PATH: trickle},
        TransportError,
        "too slow",
        extra_config="min_speed = 1000\nstall_window = 1\n",
    )


def test_garbage_version_file(tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path) -> None:
    webroot_dir.mkdir(parents=True)
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {VERSION_PATH: body(b"\x00\xffversion = [\n")},
        FormatError,
        "not valid TOML",
    )


def test_version_file_that_is_not_semver(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    webroot_dir.mkdir(parents=True)
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {VERSION_PATH: body(b'version = "../../etc"\n')},
        FormatError,
        "not a semantic version",
    )


def test_huge_version_file(tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path) -> None:
    webroot_dir.mkdir(parents=True)
    attack(
        tmp_path,
        vendor,
        pki,
        webroot_dir,
        {VERSION_PATH: body(b"#" * (1 << 20))},
        RemoteDataError,
        "cap is 4096",
    )
