"""What a release carries for the boot chain (release/webroot.py): its boot loader
(`rampart publish --loader`: only a signed systemd-boot) and Secure Boot variable
updates (`--db-append`, `--dbx-append`: only signed appends), each signed like the
release's other documents; `webroot check` audits them; a TUF release signs them as
targets of their kinds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rampart.contracts import tuf, wire
from rampart.contracts.version import parse_version
from rampart.errors import AuditError, FormatError
from rampart.release import secureboot, tufrepo, uki
from tests.conftest import KeyPair, Payloads, publish_args, run_cli
from tests.tufkit import make_keys


@pytest.fixture(scope="module")
def signed_loader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("loader")
    keys = secureboot.generate_keys(directory / "keys")
    path = directory / "systemd-bootx64.efi"
    uki.sign_copy(secureboot.SYSTEMD_BOOT, path, keys.key("db"), keys.cert("db"))
    return path


def loader_path(root: Path, version: str) -> Path:
    return root / "dist" / version / wire.loader_name("clipos")


def test_publish_ships_a_signed_systemd_boot_signed_for_its_release(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, signed_loader: Path
) -> None:
    root = tmp_path / "webroot"
    argv = [*publish_args(root, keypair, payloads, "1.0.0"), "--loader", signed_loader]
    assert run_cli(*argv).code == 0
    assert loader_path(root, "1.0.0").read_bytes() == signed_loader.read_bytes()
    check = run_cli("webroot", "check", root, "--public-key", keypair.public, "--json")
    assert check.code == 0, check.out
    assert run_cli(*argv).code == 0  # the same release again, the same loader: kept


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("unsigned", "not signed for Secure Boot"),
        ("not systemd-boot", "not a systemd-boot image"),
    ],
)
def test_publish_refuses_a_loader_the_devices_would_not_install(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, what: str, message: str
) -> None:
    root = tmp_path / "webroot"
    loader = tmp_path / "loader.efi"
    if what == "unsigned":
        shutil.copyfile(secureboot.SYSTEMD_BOOT, loader)
    else:
        loader.write_bytes(payloads["1.0.0"][1].read_bytes())  # a UKI
    result = run_cli(*publish_args(root, keypair, payloads, "1.0.0"), "--loader", loader)
    assert result.code == FormatError.exit_code
    assert message in result.err
    assert not (root / "dist").exists() or not loader_path(root, "1.0.0").exists()


def test_webroot_check_finds_a_loader_tampered_or_signed_for_another_release(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, signed_loader: Path
) -> None:
    root = tmp_path / "webroot"
    for version in ("1.0.0", "1.0.1"):
        argv = [*publish_args(root, keypair, payloads, version), "--loader", signed_loader]
        assert run_cli(*argv).code == 0
    tampered = loader_path(root, "1.0.0")
    data = bytearray(tampered.read_bytes())
    data[200] ^= 1
    tampered.chmod(0o644)
    tampered.write_bytes(bytes(data))
    moved = loader_path(root, "1.0.1")
    moved_sig = moved.with_name(moved.name + ".sig")  # 1.0.0's signature: another release
    moved_sig.chmod(0o644)
    shutil.copyfile(tampered.with_name(tampered.name + ".sig"), moved_sig)
    result = run_cli("webroot", "check", root, "--public-key", keypair.public, "--json")
    assert result.code == AuditError.exit_code
    problems = json.loads(result.out)["problems"]
    assert any(str(tampered) in p for p in problems), problems
    assert any(str(moved) in p for p in problems), problems


def test_a_tuf_release_signs_its_loader_as_a_target_of_its_kind(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, signed_loader: Path
) -> None:
    root = tmp_path / "webroot"
    argv = [*publish_args(root, keypair, payloads, "1.0.0"), "--loader", signed_loader]
    assert run_cli(*argv).code == 0
    keys, signers = make_keys(tmp_path / "tuf-keys")
    tufrepo.create(root, keys, {**signers, "root": signers["root"][:2]})
    targets = tufrepo.add_release(root, "clipos", parse_version("1.0.0"), signers).targets
    path = tuf.document_target(parse_version("1.0.0"), wire.loader_name("clipos"))
    fields = tuf.PayloadFields.from_custom(targets[path].custom, path)
    assert (fields.kind, fields.version) == (tuf.LOADER_KIND, "1.0.0")
    targets[path].verify_length_and_hashes(signed_loader.read_bytes())


@pytest.fixture(scope="module")
def appends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("appends")
    keys = secureboot.generate_keys(directory / "keys")
    new = secureboot.generate_keys(directory / "new")
    db = secureboot.signed_append(keys.directory, "db", directory / "db.auth", [new.cert("db")])
    dbx = directory / "dbx.auth"
    secureboot.signed_append(keys.directory, "dbx", dbx, [keys.cert("db")])
    assert db.payload
    return {"db": directory / "db.auth", "dbx": dbx}


def test_publish_ships_signed_appends_to_db_and_dbx_and_tuf_signs_them(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, appends: dict[str, Path]
) -> None:
    root = tmp_path / "webroot"
    argv = [
        *publish_args(root, keypair, payloads, "1.0.0"),
        "--db-append", appends["db"], "--dbx-append", appends["dbx"],
    ]  # fmt: skip
    assert run_cli(*argv).code == 0
    for variable in ("db", "dbx"):
        path = root / "dist/1.0.0" / wire.sbvar_name("clipos", variable)
        assert path.read_bytes() == appends[variable].read_bytes()
    check = run_cli("webroot", "check", root, "--public-key", keypair.public, "--json")
    assert check.code == 0, check.out
    keys, signers = make_keys(tmp_path / "tuf-keys")
    tufrepo.create(root, keys, {**signers, "root": signers["root"][:2]})
    targets = tufrepo.add_release(root, "clipos", parse_version("1.0.0"), signers).targets
    for variable in ("db", "dbx"):
        name = tuf.document_target(parse_version("1.0.0"), wire.sbvar_name("clipos", variable))
        assert tuf.PayloadFields.from_custom(targets[name].custom, name).kind == tuf.SBVAR_KIND


def test_publish_refuses_a_variable_update_that_is_not_a_signed_append(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, appends: dict[str, Path]
) -> None:
    replacing = tmp_path / "replace.auth"
    data = bytearray(appends["db"].read_bytes())
    data[0] &= ~0x40  # APPEND_WRITE off: a write that replaces db
    replacing.write_bytes(bytes(data))
    root = tmp_path / "webroot"
    result = run_cli(*publish_args(root, keypair, payloads, "1.0.0"), "--db-append", replacing)
    assert result.code == FormatError.exit_code
    assert "not an append" in result.err
    result = run_cli(
        *publish_args(root, keypair, payloads, "1.0.0"), "--dbx-append", payloads["1.0.0"][1]
    )
    assert result.code == FormatError.exit_code
