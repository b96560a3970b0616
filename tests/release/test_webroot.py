"""Publishing into the static webroot and auditing it."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from rampart.contracts import chunks, cmdline, delta, pe, signing, verity, wire
from rampart.contracts.version import parse_version
from rampart.errors import ConflictError, LocalError, UsageError
from rampart.release import webroot
from tests.conftest import KeyPair, Payloads, publish_args, run_cli, tree_snapshot
from tests.releases import build_payloads


def publish(root: Path, keypair: KeyPair, payloads: Payloads, version: str, **kw: object) -> None:
    core, efiboot = payloads[version]
    webroot.publish(
        root,
        "clipos",
        parse_version(version),
        core,
        efiboot,
        keypair.key,
        **kw,  # type: ignore[arg-type]
    )


def test_publish_writes_the_exact_clipos_layout(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    store = [name for name in found if name.startswith("dist/store.castr/")]
    assert [name for name in found if name not in store] == [
        "dist/1.0.0/clipos-core",
        "dist/1.0.0/clipos-core.caibx",
        "dist/1.0.0/clipos-core.caibx.sig",
        "dist/1.0.0/clipos-core.sig",
        "dist/1.0.0/clipos-efiboot",
        "dist/1.0.0/clipos-efiboot.sig",
        "update/v1/clipos/version",
    ]
    index = chunks.parse_index((root / "dist/1.0.0/clipos-core.caibx").read_bytes(), "i", 1 << 30)
    assert sorted(store) == sorted(
        f"dist/store.castr/{chunks.store_path(c)}" for c in set(index.ids)
    )
    version_file = root / "update/v1/clipos/version"
    assert tomllib.loads(version_file.read_text()) == {"version": "1.0.0"}
    for kind, source in zip(("core", "efiboot"), payloads["1.0.0"], strict=True):
        published = root / f"dist/1.0.0/clipos-{kind}"
        assert published.read_bytes() == source.read_bytes()
        sig = signing.load_signature(published.with_name(published.name + ".sig"))
        assert sig.trusted_comment == b"1.0.0"
        assert sig.prehashed
        signing.verify_file(published, sig, keypair.key.public_key)
    assert webroot.audit(root, keypair.key.public_key) == []


def test_named_channel_has_its_own_version_file(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    publish(root, keypair, payloads, "1.0.1", channel="beta")
    assert wire.read_version_file(root / "update/v1/clipos/version") == parse_version("1.0.0")
    beta = root / "channels/beta/update/v1/clipos/version"
    assert wire.read_version_file(beta) == parse_version("1.0.1")
    channels = {(c.name, str(c.version)) for c in wire.list_channels(root)}
    assert channels == {(None, "1.0.0"), ("beta", "1.0.1")}
    assert webroot.audit(root, keypair.key.public_key) == []


def test_channel_never_moves_backwards_without_force(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    publish(root, keypair, payloads, "1.0.1")
    before = tree_snapshot(root)
    with pytest.raises(ConflictError, match=r"refusing to go back to 1\.0\.0"):
        publish(root, keypair, payloads, "1.0.0")
    assert tree_snapshot(root) == before
    publish(root, keypair, payloads, "1.0.0", force=True)
    assert wire.read_version_file(root / "update/v1/clipos/version") == parse_version("1.0.0")


def test_republishing_the_same_release_is_idempotent(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    before = tree_snapshot(root)
    publish(root, keypair, payloads, "1.0.0")
    assert tree_snapshot(root) == before


def test_existing_release_with_other_content_is_never_overwritten(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    before = tree_snapshot(root)
    core, efiboot = build_payloads(tmp_path / "rebuilt", "1.0.0", content="rebuilt\n")
    with pytest.raises(ConflictError, match="already exists with different content"):
        webroot.publish(root, "clipos", parse_version("1.0.0"), core, efiboot, keypair.key)
    assert tree_snapshot(root) == before


def test_release_left_incomplete_by_a_crash_is_completed(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    # Simulate a crash after the core landed but before the efiboot did, with
    # a temporary file left behind, and no version file written yet.
    release = root / "dist/1.0.0"
    (release / "clipos-efiboot").unlink()
    (release / "clipos-efiboot.sig").unlink()
    (release / ".rampart-tmp-clipos-efiboot-dead").write_bytes(b"partial")
    (root / "update/v1/clipos/version").unlink()
    assert webroot.audit(root, keypair.key.public_key)  # the audit sees it
    publish(root, keypair, payloads, "1.0.0")
    assert webroot.audit(root, keypair.key.public_key) == []


def test_version_file_only_names_complete_releases(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while writing the release leaves the channel on the old version."""
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    real = webroot._copy_hashing
    calls = []

    def failing(source: Path, target: Path) -> bytes:
        calls.append(source)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(target))
        return real(source, target)

    monkeypatch.setattr(webroot, "_copy_hashing", failing)
    with pytest.raises(LocalError, match="No space left on device"):
        publish(root, keypair, payloads, "1.0.1")
    assert wire.read_version_file(root / "update/v1/clipos/version") == parse_version("1.0.0")
    assert not list((root / "dist/1.0.1").glob(".rampart-tmp-*"))


def test_large_payload_is_streamed_not_loaded(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No read of a payload asks for more than one chunk (the verity check's 4 MiB)."""
    big, big_efiboot = build_payloads(tmp_path / "big", "1.0.0", core_size=64 * signing.CHUNK)
    sizes: list[int] = []
    real_open = Path.open

    class Spy:
        def __init__(self, handle: object) -> None:
            self._h = handle

        def __getattr__(self, name: str) -> object:
            return getattr(self._h, name)

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self._h.__exit__(*exc)  # type: ignore[attr-defined]

        def read(self, n: int = -1) -> bytes:
            sizes.append(n)
            return self._h.read(n)  # type: ignore[attr-defined,no-any-return]

        def readinto(self, buffer: bytearray) -> int:
            sizes.append(len(buffer))
            return self._h.readinto(buffer)  # type: ignore[attr-defined,no-any-return]

    def spy_open(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(self, mode, *args, **kwargs)  # type: ignore[call-overload]
        return Spy(handle) if self == big else handle

    monkeypatch.setattr(Path, "open", spy_open)
    webroot.publish(
        tmp_path / "webroot",
        "clipos",
        parse_version("1.0.0"),
        big,
        big_efiboot,
        keypair.key,
    )
    assert sizes and max(sizes) <= max(signing.CHUNK, verity.READ) and -1 not in sizes


@pytest.mark.parametrize("name", ["CLIPOS", "-x", "a/b", "..", "", "a" * 65, "é"])
def test_invalid_os_names_are_refused(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, name: str
) -> None:
    core, efiboot = payloads["1.0.0"]
    with pytest.raises(UsageError):
        webroot.publish(tmp_path / "w", name, parse_version("1.0.0"), core, efiboot, keypair.key)
    assert not (tmp_path / "w").exists()


def test_unwritable_webroot_is_a_local_error(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    root.write_text("not a directory")
    core, efiboot = payloads["1.0.0"]
    with pytest.raises(LocalError, match="not a directory"):
        webroot.publish(root, "clipos", parse_version("1.0.0"), core, efiboot, keypair.key)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(LocalError):
            webroot.publish(ro, "clipos", parse_version("1.0.0"), core, efiboot, keypair.key)


def test_audit_lists_every_problem(
    tmp_path: Path, keypair: KeyPair, other_keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    publish(root, keypair, payloads, "1.0.1")
    publish(root, keypair, payloads, "1.0.2", channel="beta")
    # 1: a payload changed after signing
    with (root / "dist/1.0.0/clipos-core").open("ab") as handle:
        handle.write(b"!")
    # 2: a signature missing
    (root / "dist/1.0.1/clipos-efiboot.sig").unlink()
    # 3: a channel naming an unpublished version
    (root / "channels/beta/update/v1/clipos/version").write_text('version = "9.9.9"\n')
    # 4: stray files
    (root / "index.html").write_text("hi")
    (root / "dist/1.0.2/notes.txt").write_text("hi")
    # 5: a release signed for another version
    (root / "dist/2.0.0").mkdir()
    for name in ("clipos-core", "clipos-efiboot"):
        src = root / "dist/1.0.2" / name
        (root / "dist/2.0.0" / name).write_bytes(src.read_bytes())
        (root / "dist/2.0.0" / (name + ".sig")).write_bytes(
            (root / "dist/1.0.2" / (name + ".sig")).read_bytes()
        )
    problems = webroot.audit(root, keypair.key.public_key)
    text = "\n".join(problems)
    assert "dist/1.0.0/clipos-core: signature does not match the file" in text
    assert "dist/1.0.1/clipos-efiboot.sig: missing" in text
    assert "names 9.9.9 for clipos, which is not published" in text
    assert "index.html: unexpected entry" in text
    assert "notes.txt: unexpected entry" in text
    assert "dist/2.0.0/clipos-core.sig: trusted comment is '1.0.2'" in text
    assert "default channel names 1.0.1 for clipos, which is not published" in text
    # every signature fails with another key
    other = webroot.audit(root, other_keypair.key.public_key)
    assert sum("signed by key" in p for p in other) >= 6


def test_audit_reports_files_where_directories_belong(tmp_path: Path, keypair: KeyPair) -> None:
    root = tmp_path / "webroot"
    root.mkdir()
    (root / "dist").write_text("not a directory")
    assert webroot.audit(root, keypair.key.public_key) == [f"{root / 'dist'}: must be a directory"]
    (root / "dist").unlink()
    (root / "update/v1/clipos/version").mkdir(parents=True)
    problems = webroot.audit(root, keypair.key.public_key)
    assert any("the version file must be a regular file" in p for p in problems)


# --- security epochs -----------------------------------------------------------------------


def epoch_payloads(tmp_path: Path, epochs: dict[str, int | None]) -> Payloads:
    """Releases whose EFI binary carries `rampart.epoch=<epoch>` (None: no epoch)."""
    return {
        version: build_payloads(tmp_path / "epoch-payloads", version, epoch=epoch)
        for version, epoch in epochs.items()
    }


def publish_cli(
    root: Path, keypair: KeyPair, payloads: Payloads, version: str, *extra: str
) -> tuple[int, str, str]:
    result = run_cli(*publish_args(root, keypair, payloads, version), *extra)
    return result.code, result.out, result.err


def test_publish_reads_the_epoch_and_checks_an_asserted_one(
    tmp_path: Path, keypair: KeyPair
) -> None:
    payloads = epoch_payloads(tmp_path, {"1.0.0": None, "1.0.1": 3})
    root = tmp_path / "webroot"
    core, efiboot = payloads["1.0.0"]
    version = parse_version("1.0.0")
    result = webroot.publish(root, "clipos", version, core, efiboot, keypair.key, epoch=0)
    assert result.epoch == 0  # no rampart.epoch: epoch 0

    before = tree_snapshot(root)
    with pytest.raises(UsageError, match="has security epoch 3, not the 2 asserted"):
        publish(root, keypair, payloads, "1.0.1", epoch=2)
    code, out, err = publish_cli(root, keypair, payloads, "1.0.1", "--epoch", "2")
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert "security epoch 3, not the 2 asserted with --epoch" in err
    assert tree_snapshot(root) == before
    assert publish_cli(root, keypair, payloads, "1.0.1", "--epoch", "-1")[0] == 2

    code, out, err = publish_cli(root, keypair, payloads, "1.0.1", "--epoch", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["epoch"] == 3
    code, out, err = publish_cli(root, keypair, payloads, "1.0.1")  # idempotent, no --epoch
    assert code == 0, err
    assert "clipos 1.0.1 (security epoch 3) already published" in out


def test_a_channel_never_goes_down_in_epoch_without_force(tmp_path: Path, keypair: KeyPair) -> None:
    payloads = epoch_payloads(tmp_path, {"1.0.0": 2, "1.0.1": 1, "1.0.2": 2})
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    publish(root, keypair, payloads, "1.0.1", channel="beta")  # another channel: its own
    before = tree_snapshot(root)
    with pytest.raises(ConflictError, match=r"names 1\.0\.0 with security epoch 2, refusing to"):
        publish(root, keypair, payloads, "1.0.1")
    code, _out, err = publish_cli(root, keypair, payloads, "1.0.1")
    assert code == ConflictError.exit_code == 4
    assert "publish 1.0.1 with the lower epoch 1" in err and "--force" in err
    assert tree_snapshot(root) == before
    publish(root, keypair, payloads, "1.0.2")  # the same epoch is fine
    code, out, err = publish_cli(root, keypair, payloads, "1.0.2", "--json")
    assert code == 0, err
    assert json.loads(out)["epoch"] == 2
    code, _out, err = publish_cli(root, keypair, payloads, "1.0.1", "--force")
    assert code == 0, err
    assert wire.read_version_file(root / "update/v1/clipos/version") == parse_version("1.0.1")
    assert webroot.audit(root, keypair.key.public_key) == []


def test_publish_refuses_a_version_too_long_for_an_lv_name(
    tmp_path: Path, keypair: KeyPair
) -> None:
    """123 characters: `core_<version>` would be 128, over LVM's 127-character LV names,
    and every device would fail to install it (the client's side of the limit, 122
    installing, is in tests/device/test_client_edges.py)."""
    core, efiboot = tmp_path / "core", tmp_path / "efiboot"
    core.write_bytes(b"core")
    efiboot.write_bytes(b"efiboot")  # the version is refused before the payloads are read
    too_long = "1.0.0-" + "a" * (127 - len("core_") + 1 - len("1.0.0-"))
    before = tree_snapshot(tmp_path)
    with pytest.raises(UsageError, match=r"123 characters.*LVM's 127"):
        webroot.publish(
            tmp_path / "w", "clipos", parse_version(too_long), core, efiboot, keypair.key
        )
    assert tree_snapshot(tmp_path) == before
    payloads = {too_long: (core, efiboot)}
    code, _, err = publish_cli(tmp_path / "w", keypair, payloads, too_long)
    assert code == 2, err
    assert "123 characters" in err
    assert tree_snapshot(tmp_path) == before


def test_publish_signs_a_delta_from_the_channel_s_previous_release(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    publish(root, keypair, payloads, "1.0.1")
    name = wire.delta_name("clipos", parse_version("1.0.0"))
    path = root / "dist/1.0.1" / name
    sig = signing.load_signature(path.with_name(name + ".sig"))
    assert sig.trusted_comment == b"1.0.1" and sig.prehashed
    signing.verify_file(path, sig, keypair.key.public_key)
    made = delta.parse(path.read_bytes(), name)
    roots = {}
    for version in ("1.0.0", "1.0.1"):
        line = pe.cmdline(payloads[version][1].read_bytes()) or ""
        found = cmdline.root_hash(line, version)
        assert found is not None
        roots[version] = found.root_hash
    assert made.base_root.hex() == roots["1.0.0"]
    assert made.target_root.hex() == roots["1.0.1"]
    assert webroot.audit(root, keypair.key.public_key) == []


def test_publish_without_the_previous_release_or_with_no_delta_signs_none(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    """The channel's previous release's Core removed from the webroot (an operator's
    clean-up): the publish still succeeds, with no delta; --no-delta: none either."""
    root = tmp_path / "webroot"
    publish(root, keypair, payloads, "1.0.0")
    (root / "dist/1.0.0/clipos-core").unlink()
    publish(root, keypair, payloads, "1.0.1")
    assert not list((root / "dist/1.0.1").glob("*.delta*"))
    publish(root, keypair, payloads, "1.0.2", chunking=webroot.Chunking(deltas=False))
    assert not list((root / "dist/1.0.2").glob("*.delta*"))
