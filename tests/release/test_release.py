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


def test_a_kernel_hardening_regression_is_refused_before_building(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    """Each release records its hardening report; the next one is compared with it. A
    setting met before and a gap now refuses the release, before anything is built,
    unless it is accepted by name."""
    vendor = make_keypair(tmp_path / "vendor")
    webroot, build = tmp_path / "webroot", tmp_path / "build"
    sysctl = inputs["tree"] / "usr/lib/sysctl.d/50-rampart-hardening.conf"
    sysctl.parent.mkdir(parents=True)
    sysctl.write_text("kernel.sysrq = 0\nkernel.kptr_restrict = 1\n")
    code, out, err = release(inputs, vendor, webroot, build)
    assert code == 0, err
    assert json.loads(out)["hardening"]["baseline"] is None
    first = json.loads((build / "hardening-2.0.0.json").read_text())
    statuses = {f"{f['kind']}:{f['name']}": f["status"] for f in first["findings"]}
    assert statuses["sysctl:kernel.sysrq"] == "met"
    assert statuses["sysctl:kernel.kptr_restrict"] == "gap"  # a gap already: no regression
    assert statuses["cmdline:lockdown"] == "met"
    assert statuses["kconfig:CONFIG_DEVMEM"] == "unchecked"  # no kernel config given
    sysctl.write_text("kernel.sysrq = 1\nkernel.kptr_restrict = 1\n")
    code, _, err = release(inputs, vendor, webroot, build, "2.0.1")
    assert code == 4, err
    assert "sysctl:kernel.sysrq" in err and "kptr_restrict" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (webroot / "dist/2.0.1").exists() and not (build / "core-2.0.1.img").exists()
    code, _, err = release(
        inputs, vendor, webroot, build, "2.0.1", "--extra-cmdline", "lockdown=integrity"
    )
    assert code == 2 and "lockdown" in err  # the command line pins lockdown itself
    code, out, err = release(
        inputs,
        vendor,
        webroot,
        build,
        "2.0.1",
        "--accept-hardening-regression",
        "sysctl:kernel.sysrq",
    )
    assert code == 0, err
    assert json.loads(out)["hardening"]["regressions_accepted"] == ["sysctl:kernel.sysrq"]
    assert (build / "hardening-2.0.1.json").is_file()


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
