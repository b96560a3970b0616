"""dm-verity: Rampart's trees against the real `veritysetup`, both ways, and tampering."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rampart.contracts import verity
from rampart.errors import FormatError, VerificationError

VERITYSETUP = shutil.which("veritysetup")
BLOCKS = 16500  # three levels


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.img"
    path.write_bytes(os.urandom(BLOCKS * verity.BLOCK))
    return path


def veritysetup(*argv: str) -> subprocess.CompletedProcess[str]:
    assert VERITYSETUP, "veritysetup is not installed: run make setup"
    return subprocess.run([VERITYSETUP, *argv], capture_output=True, text=True, check=False)


def root_of(output: str) -> str:
    return next(
        line.split(":", 1)[1].strip()
        for line in output.splitlines()
        if line.startswith("Root hash")
    )


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_separate_tree_is_byte_identical_to_veritysetup(data: Path, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.hash", tmp_path / "theirs.hash"
    params = verity.build(
        data, ours, salt=b"\xaa" * 32, uuid="0b5a3e2c-1f53-4d43-9a4b-4a8b2c1d0e0f"
    )
    done = veritysetup("format", "--salt", "aa" * 32, "--uuid", params.uuid, str(data), str(theirs))
    assert done.returncode == 0, done.stderr
    assert root_of(done.stdout) == params.root_hash
    assert ours.read_bytes() == theirs.read_bytes()


def test_veritysetup_verifies_rampart_trees_separate_and_appended(
    data: Path, tmp_path: Path
) -> None:
    hash_file = tmp_path / "data.hash"
    params = verity.build(data, hash_file)
    assert veritysetup("verify", str(data), str(hash_file), params.root_hash).returncode == 0
    appended = verity.build(data)
    done = veritysetup(
        "verify",
        "--hash-offset",
        str(appended.hash_offset),
        "--data-blocks",
        str(BLOCKS),
        str(data),
        str(data),
        appended.root_hash,
    )
    assert done.returncode == 0, done.stderr


def test_rampart_verifies_veritysetup_trees_separate_and_appended(
    data: Path, tmp_path: Path
) -> None:
    hash_file = tmp_path / "vs.hash"
    done = veritysetup("format", str(data), str(hash_file))
    assert done.returncode == 0, done.stderr
    sb = verity.parse_superblock(hash_file.read_bytes()[:512], str(hash_file))
    params = verity.VerityParams(
        root_hash=root_of(done.stdout),
        salt=sb["salt"],
        data_blocks=sb["data_blocks"],
        hash_offset=0,
        uuid=sb["uuid"],
    )
    verity.verify(data, params, hash_file)
    offset = BLOCKS * verity.BLOCK
    done = veritysetup(
        "format", "--data-blocks", str(BLOCKS), "--hash-offset", str(offset), str(data), str(data)
    )
    assert done.returncode == 0, done.stderr
    with data.open("rb") as handle:
        handle.seek(offset)
        sb = verity.parse_superblock(handle.read(512), str(data))
    verity.verify(
        data,
        verity.VerityParams(
            root_hash=root_of(done.stdout),
            salt=sb["salt"],
            data_blocks=BLOCKS,
            hash_offset=offset,
            uuid=sb["uuid"],
        ),
    )


@pytest.mark.parametrize(
    "where", ["data-start", "data-middle", "data-end", "tree-top", "tree-middle", "tree-end"]
)
def test_a_flipped_bit_anywhere_is_caught_by_both(data: Path, where: str) -> None:
    params = verity.build(data)
    tree = params.hash_start
    end = data.stat().st_size
    offsets = {
        "data-start": 0,
        "data-middle": BLOCKS * verity.BLOCK // 2 + 123,
        "data-end": BLOCKS * verity.BLOCK - 1,
        "tree-top": tree + 5,
        "tree-middle": (tree + end) // 2,
        "tree-end": end - 1,
    }
    flip(data, offsets[where])
    with pytest.raises(VerificationError, match=r"corrupted|does not match"):
        verity.verify(data, params)
    done = veritysetup(
        "verify",
        "--hash-offset",
        str(params.hash_offset),
        "--data-blocks",
        str(BLOCKS),
        str(data),
        str(data),
        params.root_hash,
    )
    assert done.returncode != 0


def test_the_first_bad_data_block_is_reported(data: Path) -> None:
    params = verity.build(data)
    flip(data, 777 * verity.BLOCK + 9)
    flip(data, 9000 * verity.BLOCK)
    with pytest.raises(VerificationError, match=r"data block 777 \(byte 3182592\)"):
        verity.verify(data, params)


def test_one_block_of_data_has_a_tree_of_one_block(tmp_path: Path) -> None:
    one = tmp_path / "one.img"
    one.write_bytes(os.urandom(verity.BLOCK))
    params = verity.build(one)
    verity.verify(one, params)
    assert verity.level_sizes(1) == [1]


def test_data_not_a_multiple_of_the_block_size_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 5000)
    with pytest.raises(FormatError, match="multiple of 4096"):
        verity.build(odd)
    assert odd.stat().st_size == 5000


def test_garbage_superblock_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="no verity superblock"):
        verity.parse_superblock(os.urandom(512), "x")
