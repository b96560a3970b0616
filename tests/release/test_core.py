"""The Core bundle: reproducible squashfs + appended verity tree (+ FEC), checked with the
real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rampart.contracts import coremeta, verity
from rampart.contracts.version import parse_version
from rampart.errors import FormatError, LocalError, UsageError, VerificationError
from rampart.release import core

V = parse_version("1.0.0")


def _veritysetup_verify(image: Path, meta: coremeta.CoreMeta) -> subprocess.CompletedProcess[str]:
    """`veritysetup verify` of a bundle's appended tree against its root hash."""
    return subprocess.run(
        [
            "veritysetup",
            "verify",
            "--hash-offset",
            str(meta.data_size),
            "--data-blocks",
            str(meta.verity.data_blocks),
            str(image),
            str(image),
            meta.verity.root_hash,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="CLIP OS"\nVERSION_ID=1.0.0\n')
    (root / "usr/bin/tool").write_bytes(os.urandom(200_000))
    (root / "usr/bin/link").symlink_to("tool")
    os.utime(root / "etc/os-release", (12345, 12345))
    return root


def test_two_builds_of_one_tree_are_byte_identical(tree: Path, tmp_path: Path) -> None:
    a = core.build_core(tree, V, tmp_path / "a")
    # Touch every timestamp: the bundle must not change.
    for path in tree.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (999_999, 999_999))
    b = core.build_core(tree, V, tmp_path / "b")
    assert (tmp_path / "a/core-1.0.0.img").read_bytes() == (
        tmp_path / "b/core-1.0.0.img"
    ).read_bytes()
    assert a == b


def test_bundle_layout_checks_with_veritysetup_and_unsquashfs(tree: Path, tmp_path: Path) -> None:
    meta = core.build_core(tree, V, tmp_path / "out")
    image = tmp_path / "out/core-1.0.0.img"
    doc = json.loads((tmp_path / "out/core-1.0.0.json").read_text())
    assert doc["root_hash"] == meta.verity.root_hash and doc["hash_offset"] == meta.data_size
    assert doc["bundle_size"] == image.stat().st_size
    done = _veritysetup_verify(image, meta)
    assert done.returncode == 0, done.stderr
    listing = subprocess.run(
        ["unsquashfs", "-l", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "squashfs-root/usr/bin/tool" in listing
    assert coremeta.load(tmp_path / "out/core-1.0.0.json") == meta


def test_a_compressed_core_is_smaller_reproducible_and_checks_with_veritysetup(
    tree: Path, tmp_path: Path
) -> None:
    (tree / "usr/share").mkdir()
    (tree / "usr/share/text").write_bytes(b"compressible line\n" * 50_000)
    plain = core.build_core(tree, V, tmp_path / "plain")
    meta = core.build_core(tree, V, tmp_path / "a", compression="zstd")
    again = core.build_core(tree, V, tmp_path / "b", compression="zstd")
    image = tmp_path / "a/core-1.0.0.img"
    assert meta == again and image.read_bytes() == (tmp_path / "b/core-1.0.0.img").read_bytes()
    assert meta.data_size < plain.data_size
    stat = subprocess.run(
        ["unsquashfs", "-s", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "Compression zstd" in stat
    done = _veritysetup_verify(image, meta)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "x"
    subprocess.run(["unsquashfs", "-q", "-d", str(out), str(image)], check=True)
    assert (out / "usr/share/text").read_bytes() == (tree / "usr/share/text").read_bytes()


def test_an_unknown_compression_is_refused_before_anything_is_written(
    tree: Path, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="compression 'brotli': not one of"):
        core.build_core(tree, V, tmp_path / "out", compression="brotli")
    assert not (tmp_path / "out").exists()


def test_fec_bundle_checks_with_veritysetup(tree: Path, tmp_path: Path) -> None:
    meta = core.build_core(tree, V, tmp_path / "out", fec=True)
    image = tmp_path / "out/core-1.0.0.img"
    assert meta.fec_offset is not None and meta.fec_roots == 2
    done = subprocess.run(
        [
            "veritysetup",
            "verify",
            "--hash-offset",
            str(meta.data_size),
            "--data-blocks",
            str(meta.verity.data_blocks),
            "--fec-device",
            str(image),
            "--fec-offset",
            str(meta.fec_offset),
            "--fec-roots",
            "2",
            str(image),
            str(image),
            meta.verity.root_hash,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    core.verify_core(image, meta)
    # The hash tree is the one Rampart builds without FEC.
    plain = core.build_core(tree, V, tmp_path / "plain")
    assert plain.verity.root_hash == meta.verity.root_hash


def test_tampered_image_is_caught(tree: Path, tmp_path: Path) -> None:
    meta = core.build_core(tree, V, tmp_path / "out")
    image = tmp_path / "out/core-1.0.0.img"
    data = bytearray(image.read_bytes())
    data[meta.data_size // 2] ^= 0x80
    image.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="data block"):
        core.verify_core(image, meta)


def test_a_tree_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        core.build_core(not_a_dir, V, tmp_path / "out")


def test_missing_tool_is_one_clear_line_and_nothing_is_left(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LocalError, match="mksquashfs: command not found"):
        core.build_core(tree, V, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failed_build_leaves_no_partial_output(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> object:
        raise FormatError("simulated failure while hashing")

    monkeypatch.setattr(verity, "build", broken)
    with pytest.raises(FormatError):
        core.build_core(tree, V, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_metadata_that_is_not_json_is_a_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "meta.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError, match="not a Core metadata file"):
        coremeta.load(bad)
    assert shutil.which("mksquashfs"), "run make setup"
