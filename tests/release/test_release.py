"""`rampart release`: from a root tree to a signed, published release in one command,
every output checked with the reference tools, then installed by the client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rampart.contracts import pe
from rampart.release import secureboot
from tests.conftest import KeyPair, make_keypair, run_cli
from tests.release import bootkit


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text('NAME="CLIP OS"\nID=clipos\nVERSION_ID=2.0.0\n')
    keys = secureboot.generate_keys(tmp_path / "sb")
    return {
        "tree": tree,
        "kernel": bootkit.kernel(),
        "initrd": bootkit.tiny_initrd(tmp_path / "initrd.img"),
        "db_key": keys.key("db"),
        "db_cert": keys.cert("db"),
    }


def release(
    inputs: dict[str, Path],
    vendor: KeyPair,
    webroot: Path,
    out: Path,
    version: str = "2.0.0",
    *extra: str | Path,
) -> tuple[int, str, str]:
    result = run_cli(
        "release",
        inputs["tree"],
        "--version",
        version,
        "--os",
        "clipos",
        "--kernel",
        inputs["kernel"],
        "--initrd",
        inputs["initrd"],
        "--sign-key",
        inputs["db_key"],
        "--sign-cert",
        inputs["db_cert"],
        "--secret-key",
        vendor.secret,
        "--webroot",
        webroot,
        "--out",
        out,
        "--json",
        *extra,
    )
    return result.code, result.out, result.err


def test_one_command_from_tree_to_published_release(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    vendor = make_keypair(tmp_path / "vendor")
    webroot = tmp_path / "webroot"
    code, out, err = release(inputs, vendor, webroot, tmp_path / "build")
    assert code == 0, err
    info = json.loads(out)
    root = info["core"]["root_hash"]
    # The webroot is sound and the signatures carry the version.
    check = run_cli("webroot", "check", webroot, "--public-key", vendor.public)
    assert check.code == 0, check.err
    efiboot = webroot / "dist/2.0.0/clipos-efiboot"
    assert run_cli("verify", efiboot, "--public-key", vendor.public, "--version", "2.0.0").code == 0
    # The EFI binary is signed by db and boots exactly this Core.
    assert bootkit.sbverify(efiboot, inputs["db_cert"]).returncode == 0
    line = pe.cmdline(efiboot.read_bytes())
    assert line is not None and f"rampart.verity.roothash={root}" in line
    assert "rampart.core=mainvg/core_2.0.0" in line
    # Core checks with Rampart's verifier and its metadata.
    meta = tmp_path / "build/core-2.0.0.json"
    assert run_cli("verity", "verify", webroot / "dist/2.0.0/clipos-core", "--meta", meta).code == 0
    inspected = run_cli("inspect", "efiboot", efiboot, "--json")
    assert inspected.code == 0, inspected.err
    assert json.loads(inspected.out)["version"] == "2.0.0"


def test_release_with_a_wrong_signing_pair_publishes_nothing(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    vendor = make_keypair(tmp_path / "vendor")
    other = secureboot.generate_keys(tmp_path / "other")
    inputs = {**inputs, "db_cert": other.cert("db")}
    webroot = tmp_path / "webroot"
    code, _, err = release(inputs, vendor, webroot, tmp_path / "build")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert not webroot.exists() or not any(webroot.rglob("*"))


def test_releasing_a_published_version_again_is_refused_before_building(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    vendor = make_keypair(tmp_path / "vendor")
    webroot = tmp_path / "webroot"
    assert release(inputs, vendor, webroot, tmp_path / "build")[0] == 0
    code, _, err = release(inputs, vendor, webroot, tmp_path / "build2")
    assert code == 4 and "already published" in err
    assert not (tmp_path / "build2").exists()


def test_extra_parameters_cannot_undo_the_hardening(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    vendor = make_keypair(tmp_path / "vendor")
    for param in ("mitigations=off", "init_on_free=0", "rdinit=/bin/sh", "lockdown=none"):
        result = run_cli(
            "release",
            inputs["tree"],
            "--version",
            "2.0.0",
            "--os",
            "clipos",
            "--kernel",
            inputs["kernel"],
            "--initrd",
            inputs["initrd"],
            "--sign-key",
            inputs["db_key"],
            "--sign-cert",
            inputs["db_cert"],
            "--secret-key",
            vendor.secret,
            "--webroot",
            tmp_path / "w",
            "--out",
            tmp_path / "out",
            "--extra-cmdline",
            param,
        )
        assert result.code == 2, (param, result.err)
        assert not (tmp_path / "out").exists()


def test_a_release_carries_signed_db_and_dbx_appends(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    """`--db-append` and `--dbx-append` (what `rampart keys db-append|dbx-append` made
    with the KEK) are published beside the payloads, each signed for the version."""
    vendor = make_keypair(tmp_path / "vendor")
    rotated = secureboot.generate_keys(tmp_path / "rotated")
    appends = {
        "db": secureboot.signed_append(
            tmp_path / "sb", "db", tmp_path / "db.auth", certificates=[rotated.cert("db")]
        ),
        "dbx": secureboot.signed_append(
            tmp_path / "sb", "dbx", tmp_path / "dbx.auth", certificates=[inputs["db_cert"]]
        ),
    }
    assert all(a.payload for a in appends.values())
    webroot = tmp_path / "webroot"
    code, _, err = release(
        inputs, vendor, webroot, tmp_path / "build", "2.0.0",
        "--db-append", tmp_path / "db.auth", "--dbx-append", tmp_path / "dbx.auth",
    )  # fmt: skip
    assert code == 0, err
    for variable in ("db", "dbx"):
        published = webroot / f"dist/2.0.0/clipos-{variable}.auth"
        assert published.read_bytes() == (tmp_path / f"{variable}.auth").read_bytes()
        assert (
            run_cli("verify", published, "--public-key", vendor.public, "--version", "2.0.0").code
            == 0
        )
    check = run_cli("webroot", "check", webroot, "--public-key", vendor.public)
    assert check.code == 0, check.err
