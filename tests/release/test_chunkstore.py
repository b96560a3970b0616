"""The chunk indexes and store of a webroot (release/chunkstore.py): `webroot check`
audits them, `webroot gc` removes what no release references, and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rampart.contracts import chunks, wire
from rampart.contracts.version import parse_version
from rampart.errors import AuditError
from tests.conftest import KeyPair, Payloads, publish_args, run_cli, tree_snapshot


def published(tmp_path: Path, keypair: KeyPair, payloads: Payloads, *versions: str) -> Path:
    root = tmp_path / "webroot"
    for version in versions:
        assert run_cli(*publish_args(root, keypair, payloads, version)).code == 0
    return root


def check(root: Path, keypair: KeyPair, *extra: str) -> list[str]:
    result = run_cli("webroot", "check", root, "--public-key", keypair.public, "--json", *extra)
    assert result.code in (0, AuditError.exit_code), result.err
    problems: list[str] = json.loads(result.out)["problems"]
    return problems


def index_of(root: Path, version: str) -> chunks.ChunkIndex:
    path = root / f"dist/{version}/{wire.index_name('clipos')}"
    return chunks.parse_index(path.read_bytes(), str(path), 1 << 30)


def test_a_published_webroot_with_chunks_is_sound(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = published(tmp_path, keypair, payloads, "1.0.0", "1.0.1")
    assert check(root, keypair, "--verify-chunks") == []


def test_check_finds_a_missing_chunk_and_with_verify_chunks_a_corrupt_one(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = published(tmp_path, keypair, payloads, "1.0.0")
    ids = index_of(root, "1.0.0").ids
    store = wire.store_dir(root)
    (store / chunks.store_path(ids[0])).unlink()
    corrupt = store / chunks.store_path(ids[1])
    corrupt.chmod(0o644)
    corrupt.write_bytes(chunks.compress(b"something else", "zstd", 3))
    problems = check(root, keypair)
    assert len(problems) == 1 and "missing (a chunk of" in problems[0]
    problems = check(root, keypair, "--verify-chunks")
    assert len(problems) == 2 and "cannot decompress" in problems[1]


def test_check_finds_an_index_signed_for_another_release_and_stray_store_files(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = published(tmp_path, keypair, payloads, "1.0.0", "1.0.1")
    name = wire.index_name("clipos")
    for suffix in ("", ".sig"):
        shutil.copyfile(root / f"dist/1.0.0/{name}{suffix}", root / f"dist/1.0.1/{name}{suffix}")
    (wire.store_dir(root) / "stray").write_text("x")
    problems = check(root, keypair)
    assert any("signed for '1.0.0', not '1.0.1'" in p for p in problems), problems
    assert any("stray: unexpected entry in the chunk store" in p for p in problems), problems


def test_check_finds_a_delta_tampered_or_moved_to_another_release(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = published(tmp_path, keypair, payloads, "1.0.0", "1.0.1", "1.0.2")
    name = wire.delta_name("clipos", parse_version("1.0.0"))
    assert (root / f"dist/1.0.1/{name}").is_file()
    assert check(root, keypair) == []
    # the delta 1.0.0 -> 1.0.1 served as 1.0.2's, its signature along
    for suffix in ("", ".sig"):
        shutil.copyfile(root / f"dist/1.0.1/{name}{suffix}", root / f"dist/1.0.2/{name}{suffix}")
    tampered = root / f"dist/1.0.1/{name}"
    data = bytearray(tampered.read_bytes())
    data[100] ^= 1
    tampered.write_bytes(bytes(data))
    (root / f"dist/1.0.0/{name}.sig").write_bytes(b"stray")
    problems = check(root, keypair)
    assert any("signed for '1.0.1', not '1.0.2'" in p for p in problems), problems
    assert any(str(tampered) in p and "signature" in p for p in problems), problems
    assert any(f"dist/1.0.0/{name}: missing" in p for p in problems), problems
    assert len(problems) == 3, problems


def test_gc_removes_only_the_chunks_no_release_references(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = published(tmp_path, keypair, payloads, "1.0.0", "1.0.1")
    kept = {chunks.store_path(c) for c in index_of(root, "1.0.1").ids}
    gone = {chunks.store_path(c) for c in index_of(root, "1.0.0").ids} - kept
    assert gone
    before = tree_snapshot(root)
    dry = run_cli("webroot", "gc", root, "--dry-run", "--json")
    assert dry.code == 0 and json.loads(dry.out)["removed"] == 0
    assert tree_snapshot(root) == before  # a dry run changes nothing
    assert run_cli("webroot", "gc", root).code == 0
    assert tree_snapshot(root) == before  # both releases still reference every chunk
    shutil.rmtree(root / "dist/1.0.0")
    result = run_cli("webroot", "gc", root, "--json")
    assert result.code == 0 and json.loads(result.out)["removed"] == len(gone)
    store = wire.store_dir(root)
    left = {f"{p.parent.name}/{p.name}" for p in store.glob("*/*")}
    assert left == kept
    # 1.0.1 is whole; only the channel's release was removed
    problems = check(root, keypair, "--verify-chunks")
    assert all("1.0.0" in p for p in problems), problems


def test_gc_refuses_when_an_index_cannot_be_read(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = published(tmp_path, keypair, payloads, "1.0.0", "1.0.1")
    shutil.rmtree(root / "dist/1.0.0")
    (root / f"dist/1.0.1/{wire.index_name('clipos')}").write_bytes(b"garbage")
    before = tree_snapshot(root)
    result = run_cli("webroot", "gc", root)
    assert result.code == 10 and "nothing collected" in result.err
    assert tree_snapshot(root) == before
