"""The TUF repository beside a webroot (rampart.release.tufrepo), read back by
python-tuf's own client, unmodified: ngclient's `Updater` given the root, over HTTP
from nginx (tests' services), downloads every target of a Rampart repository."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from rampart.contracts import cmdline, pe, tuf
from rampart.contracts.tufrepo import publish_snapshot, refresh
from rampart.contracts.version import parse_version
from rampart.errors import ConflictError
from rampart.release import tufrepo, tufstatus
from rampart.testbed import services
from tests.conftest import KeyPair
from tests.device.conftest import OS, make_release, publish
from tests.release.tufkit import PASSWORD as KIT_PASSWORD
from tests.release.tufkit import Repo, make_repository, one_line, tree
from tests.tufkit import PASSWORD, make_keys

Repository = tuple[Path, dict[str, list[Signer]]]  # the webroot, the signers by role


@pytest.fixture
def repository(tmp_path: Path, keypair: KeyPair) -> Repository:
    """A webroot with release 1.0.0 published and added to a new TUF repository."""
    webroot = tmp_path / "webroot"
    publish(webroot, keypair, make_release(tmp_path / "r1", "1.0.0"))
    keys, signers = make_keys(tmp_path / "tuf-keys")
    tufrepo.create(webroot, keys, {**signers, "root": signers["root"][:2]})
    tufrepo.add_release(webroot, OS, parse_version("1.0.0"), signers)
    return webroot, signers


def test_key_files_are_encrypted_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    tufrepo.generate_key(path, PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    with pytest.raises(ConflictError):
        tufrepo.generate_key(path, PASSWORD)


def test_python_tuf_ngclient_downloads_every_target_of_a_rampart_repository(
    tmp_path: Path, repository: Repository
) -> None:
    webroot, _ = repository
    client = tmp_path / "client"
    (client / "metadata").mkdir(parents=True)
    (client / "targets").mkdir()
    root = (tufrepo.metadata_dir(webroot) / "1.root.json").read_bytes()
    with services.Nginx.static(tmp_path / "nginx", webroot) as nginx:
        updater = Updater(
            metadata_dir=str(client / "metadata"),
            metadata_base_url=f"{nginx.url}/tuf/",
            target_dir=str(client / "targets"),
            target_base_url=f"{nginx.url}/",
            bootstrap=root,
            # The targets are the webroot's own dist/ files, not hash-prefixed copies.
            config=UpdaterConfig(prefix_targets_with_hash=False),
        )
        updater.refresh()
        for kind in ("core", "efiboot"):
            path = tuf.payload_target(OS, parse_version("1.0.0"), kind)
            info = updater.get_targetinfo(path)
            assert info is not None, path
            fields = info.custom[tuf.CUSTOM]
            assert (fields["os"], fields["kind"], fields["version"]) == (OS, kind, "1.0.0")
            downloaded = Path(updater.download_target(info))
            assert downloaded.read_bytes() == (webroot / path).read_bytes()
    # The Core's target binds the verity root hash its UKI pins.
    uki = webroot / tuf.payload_target(OS, parse_version("1.0.0"), "efiboot")
    pinned = cmdline.root_hash(pe.cmdline(uki.read_bytes(), uki.name) or "", uki.name)
    assert pinned is not None
    core = updater.get_targetinfo(tuf.payload_target(OS, parse_version("1.0.0"), "core"))
    assert core is not None
    assert core.custom[tuf.CUSTOM]["verity"]["root_hash"] == pinned.root_hash


def test_a_release_s_chunk_index_and_delta_are_targets_of_their_kind(
    tmp_path: Path, repository: Repository, keypair: KeyPair
) -> None:
    """`add_release` signs what `rampart publish` wrote beside the payloads: Core's
    chunk index and its delta from the release before, each with its kind, its
    version and the exact bytes served."""
    webroot, signers = repository
    publish(webroot, keypair, make_release(tmp_path / "r2", "1.1.0"), deltas=True)
    targets = tufrepo.add_release(webroot, OS, parse_version("1.1.0"), signers).targets
    documents = {
        f"dist/1.0.0/{OS}-core.caibx": ("index", "1.0.0"),
        f"dist/1.1.0/{OS}-core.caibx": ("index", "1.1.0"),
        f"dist/1.1.0/{OS}-core.from-1.0.0.delta": ("delta", "1.1.0"),
    }
    for path, (kind, version) in documents.items():
        target = targets[path]
        fields = tuf.PayloadFields.from_custom(target.custom, path)
        assert (fields.os, fields.kind, fields.version) == (OS, kind, version)
        target.verify_length_and_hashes((webroot / path).read_bytes())


def test_metadata_round_trips_through_the_metadata_api_verification(
    repository: Repository,
) -> None:
    webroot, _ = repository
    directory = tufrepo.metadata_dir(webroot)
    root = Metadata[Root].from_file(str(directory / "1.root.json"))
    root.verify_delegate(Root.type, root)
    targets = Metadata[Targets].from_file(str(directory / "2.targets.json"))
    root.verify_delegate(Targets.type, targets)
    assert json.loads((directory / "2.targets.json").read_bytes()) == json.loads(targets.to_bytes())


def test_key_compromise_below_the_threshold_one_root_key_signs_nothing_accepted(
    tmp_path: Path, repository: Repository
) -> None:
    """One root key of 2-of-3 stolen: a root it signs alone does not verify."""
    webroot, signers = repository
    directory = tufrepo.metadata_dir(webroot)
    root = Metadata[Root].from_file(str(directory / "1.root.json"))
    forged = Metadata[Root].from_file(str(directory / "1.root.json"))
    forged.signed.version = 2
    forged.signatures.clear()
    forged.sign(signers["root"][2])
    with pytest.raises(UnsignedMetadataError):
        root.verify_delegate(Root.type, forged)


def test_a_release_never_changes_once_it_is_a_target(
    repository: Repository,
) -> None:
    webroot, signers = repository
    with pytest.raises(ConflictError, match="already a target"):
        tufrepo.add_release(webroot, OS, parse_version("1.0.0"), signers)


def test_refreshing_the_timestamp_signs_a_new_version_that_expires_in_a_day(
    repository: Repository,
) -> None:
    webroot, signers = repository
    path = tufrepo.metadata_dir(webroot) / "timestamp.json"
    before = Metadata[Timestamp].from_file(str(path)).signed
    after = tufrepo.refresh_timestamp(webroot, signers)
    assert after.version == before.version + 1
    assert after.snapshot_meta.version == before.snapshot_meta.version
    left = after.expires - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(hours=23) < left <= datetime.timedelta(days=1)
    assert Metadata[Timestamp].from_file(str(path)).signed.version == after.version


# --- key ceremonies, judged by python-tuf's own client ---------------------------------------


@pytest.fixture
def repo(tmp_path: Path, keypair: KeyPair) -> Repo:
    return make_repository(tmp_path, keypair)


def test_every_ceremony_through_the_verbs_leaves_a_repository_python_tuf_accepts(
    repo: Repo, keypair: KeyPair
) -> None:
    """Each key ceremony of every role, one after the other; after each one a device
    that has followed along and a new one bootstrapped with root 1 both accept the
    repository and download a release, and `rampart tuf status` finds nothing wrong."""
    device, webroot = repo.client("follower"), repo.webroot
    device.download("1.0.0")
    roots = [1]

    def accepted(version: str = "1.0.0") -> None:
        device.download(version)
        repo.client(f"new-{len(roots)}").download(version)
        assert repo.run("tuf", "status", webroot).code == 0
        roots.append(device.trusted("root"))

    root_keys = ("--key", repo.key("r0"), "--key", repo.key("r1"))
    online = ("--key", repo.key("o0"))
    # targets: a second release key, then the first one revoked (targets re-signed by t1)
    done = repo.ok("tuf", "key", "add", webroot, "targets", repo.key("t1"), *root_keys)
    assert done["published"] and done["versions"] == {"root": 2}
    accepted()
    t1 = ("--key", repo.key("t1"))
    done = repo.ok(
        "tuf", "key", "revoke", webroot, "targets", repo.keyid("t0")[:12], *root_keys, *online, *t1
    )
    assert done["versions"] == {"root": 3, "targets": 3, "snapshot": 3, "timestamp": 3}
    targets = Metadata[Targets].from_file(str(repo.metadata / "3.targets.json"))
    assert set(targets.signatures) == {repo.keyid("t1")}
    accepted()
    # the online roles: each of o0's roles moves to o1 (re-signed by it)
    new_online = ("--key", repo.key("o1"))
    for role in ("snapshot", "timestamp", "channels"):
        keys = (*root_keys, *online, *new_online, "--key", repo.key("t1"))
        done = repo.ok(
            "tuf", "key", "rotate", webroot, role, repo.keyid("o0"), repo.key("o1"), *keys
        )
        assert role in done["versions"], done
        accepted()
    channels = Metadata[Targets].from_file(str(repo.metadata / "2.channels.json"))
    assert set(channels.signatures) == {repo.keyid("o1")}
    # root: r2 replaced by r3, then a new root version with threshold 3 of 3
    done = repo.ok(
        "tuf", "key", "rotate", webroot, "root", repo.keyid("r2"), repo.key("r3"), *root_keys
    )
    assert done["versions"] == {"root": 6}
    accepted()
    done = repo.ok(
        "tuf", "root", "rotate", webroot, "--threshold", "3", "--expires", "60",
        *root_keys, "--key", repo.key("r3"),
    )  # fmt: skip
    assert done["versions"] == {"root": 7}
    root = Metadata[Root].from_file(str(repo.metadata / "7.root.json")).signed
    assert root.roles["root"].threshold == 3
    assert root.roles["root"].keyids == [repo.keyid(n) for n in ("r0", "r1", "r3")]
    accepted()
    # the timer's verb, and a release signed by the new keys only
    done = repo.ok("tuf", "timestamp", webroot, "--online-key", repo.key("o1"))
    assert set(done["signed"]) == {"timestamp"}
    accepted()
    repo.publish("1.0.1", keypair)
    repo.ok(
        "tuf", "add-release", webroot, "1.0.1", "--os", OS,
        "--targets-key", repo.key("t1"), "--online-key", repo.key("o1"),
    )  # fmt: skip
    accepted("1.0.1")
    assert roots == [1, 2, 3, 4, 5, 5, 6, 7, 7, 7]  # channels' keys are in targets
    assert not (repo.metadata / "staged").exists()


def test_offline_signing_by_key_holders_who_never_share_keys(repo: Repo) -> None:
    """A root key rotated with no root key at hand: the ceremony is staged, exported, each
    holder signs a copy on their own machine, the copies are imported one by one; the
    first is not enough (exit 7, its signature kept), the second publishes."""
    webroot = repo.webroot
    device = repo.client()
    device.refresh()
    staged = repo.ok(
        "tuf", "key", "rotate", webroot, "root", repo.keyid("r2"), repo.pub("r3"),
        "--key", repo.key("o0"), "--stage",
    )  # fmt: skip
    assert (staged["published"], staged["staged"]) == (False, ["2.root.json"])
    assert [s["missing"] for s in staged["missing"]] == [2, 2]
    before = tree(repo.metadata)
    copies = {}
    for holder in ("r0", "r1", "r3"):
        machine = webroot.parent / f"machine-{holder}"
        machine.mkdir()
        copies[holder] = machine / "root.json"
        out = repo.ok("tuf", "sign", "export", webroot, "root", "--out", copies[holder])
        assert out["version"] == 2 and out["signed_by"] == []
        # the holder's machine: no webroot, only the copy and the key
        added = repo.ok("tuf", "sign", "add", copies[holder], "--key", repo.key(holder))
        assert added["added"] == [repo.keyid(holder)]
    result = repo.run("tuf", "sign", "import", webroot, copies["r0"], "--key", repo.key("o0"))
    assert result.code == 7
    assert "1 more signature(s) of the root keys of root 1" in one_line(result)
    assert tree(repo.metadata) != before  # r0's signature kept in staged/
    assert not (repo.metadata / "2.root.json").exists()
    done = repo.ok(
        "tuf", "sign", "import", webroot, copies["r1"], copies["r3"], "--key", repo.key("o0")
    )
    assert done["versions"] == {"root": 2}
    assert set(done["merged"]) == {repo.keyid("r1"), repo.keyid("r3")}
    root = Metadata[Root].from_file(str(repo.metadata / "2.root.json"))
    assert set(root.signatures) == {repo.keyid(n) for n in ("r0", "r1", "r3")}
    device.download("1.0.0")
    assert device.trusted("root") == 2
    repo.client("new").download("1.0.0")


def test_key_compromise_root_rotation_signed_by_old_keys_only_is_refused(repo: Repo) -> None:
    """Two old root keys (r0, r2) sign a root whose new key set they do not control to
    a threshold: the verb refuses it with nothing written, and a device refuses the same
    root written into the webroot by hand."""
    webroot = repo.webroot
    device = repo.client()
    device.refresh()
    before = tree(repo.metadata)
    result = repo.run(
        "tuf", "key", "rotate", webroot, "root", repo.keyid("r2"), repo.pub("r3"),
        "--key", repo.key("r0"), "--key", repo.key("r2"), "--key", repo.key("o0"),
    )  # fmt: skip
    assert result.code == 7
    assert "1 more signature(s) of the root keys of root 2" in one_line(result)
    assert tree(repo.metadata) == before
    # The same root, staged and then written where a device fetches it.
    repo.ok(
        "tuf", "key", "rotate", webroot, "root", repo.keyid("r2"), repo.pub("r3"),
        "--key", repo.key("r0"), "--key", repo.key("r2"), "--stage",
    )  # fmt: skip
    forged = repo.metadata / "staged" / "2.root.json"
    forged.rename(repo.metadata / "2.root.json")
    with pytest.raises(UnsignedMetadataError):
        device.refresh()
    assert device.trusted("root") == 1
    status = repo.run("tuf", "status", webroot)
    assert status.code == 5
    assert "root 2: signed by 2 of the 2 needed keys of root 1 and 1 of the 2" in status.err


def test_key_compromise_root_rotation_signed_by_new_keys_only_is_refused(
    repo: Repo, tmp_path: Path
) -> None:
    """A root signed by a threshold of its own keys but not of root 1's (r0 alone of the
    old, r0 and r3 of the new) is refused; so is an attacker's root 2 listing only keys
    they made, signed by those keys."""
    webroot = repo.webroot
    device = repo.client()
    device.refresh()
    before = tree(repo.metadata)
    result = repo.run(
        "tuf", "key", "rotate", webroot, "root", repo.keyid("r2"), repo.key("r3"),
        "--key", repo.key("r0"), "--key", repo.key("o0"),
    )  # fmt: skip
    assert result.code == 7
    assert "1 more signature(s) of the root keys of root 1" in one_line(result)
    assert tree(repo.metadata) == before
    # The attacker's own root: their keys in every role, signed by them.
    attacker = [tufrepo.generate_key(tmp_path / f"a{n}.key", None) for n in range(3)]
    forged = Metadata[Root].from_file(str(repo.metadata / "1.root.json"))
    forged.signed.version = 2
    for role in ("root", "targets", "snapshot", "timestamp"):
        for keyid in list(forged.signed.roles[role].keyids):
            forged.signed.revoke_key(keyid, role)
        for key in attacker:
            forged.signed.add_key(key, role)
    forged.signatures.clear()
    for n in range(3):
        forged.sign(tufrepo.load_signer(tmp_path / f"a{n}.key", None), append=True)
    forged.to_file(str(repo.metadata / "2.root.json"))
    with pytest.raises(UnsignedMetadataError):
        device.refresh()
    assert device.trusted("root") == 1


def test_a_revoked_targets_key_signature_no_longer_counts(repo: Repo, tmp_path: Path) -> None:
    """t0 revoked (t1 in its place): targets signed by t0, even with snapshot and
    timestamp naming it (the online key stolen too), is refused by a device."""
    webroot = repo.webroot
    repo.ok(
        "tuf", "key", "rotate", webroot, "targets", repo.keyid("t0"), repo.key("t1"),
        "--key", repo.key("r0"), "--key", repo.key("r1"), "--key", repo.key("o0"),
    )  # fmt: skip
    device = repo.client()
    device.download("1.0.0")
    t0 = tufrepo.load_signer(repo.key("t0"), KIT_PASSWORD.encode())
    o0 = tufrepo.load_signer(repo.key("o0"), KIT_PASSWORD.encode())
    forged = Metadata[Targets].from_file(str(repo.metadata / "3.targets.json"))
    forged.signed.version += 1
    forged.sign(t0)
    forged.to_file(str(repo.metadata / "4.targets.json"))
    publish_snapshot(webroot, {"snapshot": [o0], "timestamp": [o0]})
    with pytest.raises(UnsignedMetadataError):
        device.refresh()
    assert device.trusted("targets") == 3
    status = repo.run("tuf", "status", webroot)
    assert status.code == 5
    assert "targets 4: signed by 0 of the 1 keys needed" in status.err


def test_a_crash_while_publishing_a_ceremony_is_finished_by_import(
    repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power lost after the new root and targets were written, before the snapshot: the
    ceremony is still in staged/, and `sign import` finishes it."""
    webroot = repo.webroot
    pool = [
        tufrepo.load_signer(repo.key(name), KIT_PASSWORD.encode()) for name in ("r0", "r1", "t1")
    ]
    online = tufrepo.load_signer(repo.key("o0"), KIT_PASSWORD.encode())
    ceremony = tufrepo.change_keys(
        webroot, "targets", add=[pool[2].public_key], revoke=[repo.keyid("t0")]
    )
    tufrepo.sign_ceremony(webroot, ceremony, pool)

    def power_cut(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(tufrepo, "sign_snapshot", power_cut)
    with pytest.raises(OSError, match="power cut"):
        tufrepo.publish(webroot, ceremony, [*pool, online])
    monkeypatch.undo()
    assert (repo.metadata / "2.root.json").exists() and (repo.metadata / "3.targets.json").exists()
    assert not (repo.metadata / "3.snapshot.json").exists()
    assert sorted(p.name for p in (repo.metadata / "staged").iterdir()) == [
        "2.root.json",
        "3.targets.json",
    ]
    assert repo.run("tuf", "status", webroot).code == 5  # the snapshot names targets 2
    done = repo.ok("tuf", "sign", "import", webroot, "--key", repo.key("o0"))
    assert done["versions"] == {"snapshot": 3, "timestamp": 3}
    repo.client().download("1.0.0")
    assert repo.run("tuf", "status", webroot).code == 0


def test_python_tuf_ngclient_over_nginx_follows_a_root_rotation(tmp_path: Path, repo: Repo) -> None:
    """Served by nginx as devices get it: a client that only knows root 1 follows a root
    key rotation and a targets key rotation to the new keys."""
    webroot = repo.webroot
    keys = ("--key", repo.key("r0"), "--key", repo.key("r1"), "--key", repo.key("o0"))
    repo.ok("tuf", "key", "rotate", webroot, "root", repo.keyid("r2"), repo.key("r3"), *keys)
    repo.ok("tuf", "key", "rotate", webroot, "targets", repo.keyid("t0"), repo.key("t1"), *keys)
    client = tmp_path / "client"
    (client / "metadata").mkdir(parents=True)
    (client / "targets").mkdir()
    with services.Nginx.static(tmp_path / "nginx", webroot) as nginx:
        updater = Updater(
            metadata_dir=str(client / "metadata"),
            metadata_base_url=f"{nginx.url}/tuf/",
            target_dir=str(client / "targets"),
            target_base_url=f"{nginx.url}/",
            bootstrap=(repo.metadata / "1.root.json").read_bytes(),
            config=UpdaterConfig(prefix_targets_with_hash=False),
        )
        updater.refresh()
        info = updater.get_targetinfo(tuf.payload_target(OS, parse_version("1.0.0"), "core"))
        assert info is not None
        updater.download_target(info)
    root = json.loads((client / "metadata" / "root.json").read_bytes())
    assert root["signed"]["version"] == 3
    assert repo.keyid("r3") in root["signed"]["roles"]["root"]["keyids"]


def test_the_timer_resigns_snapshot_and_channels_within_half_their_lifetime(
    repo: Repo,
) -> None:
    """`refresh` at day 0 signs only the timestamp; at day 4 (of 7) also the channels
    metadata and the snapshot, which then names the new channels version."""
    webroot = repo.webroot
    online = tufrepo.load_signer(repo.key("o0"), KIT_PASSWORD.encode())
    signers = {role: [online] for role in ("snapshot", "timestamp", "channels")}
    now = datetime.datetime.now(datetime.UTC)
    done = refresh(webroot, signers, datetime.timedelta(hours=2), now)
    assert (done.snapshot, done.channels) == (None, None)
    assert done.timestamp.expires - now < datetime.timedelta(hours=2, seconds=1)
    later = now + datetime.timedelta(days=4)
    done = refresh(webroot, signers, now=later)
    assert done.channels is not None and done.snapshot is not None
    assert done.snapshot.meta["channels.json"].version == done.channels.version
    assert done.timestamp.snapshot_meta.version == done.snapshot.version
    assert tufstatus.status(webroot, later).problems == []
    # A day later (the timer stopped), the timestamp has expired: status says so.
    problems = tufstatus.status(webroot, later + datetime.timedelta(days=1)).problems
    assert any("timestamp" in p and "expired" in p for p in problems), problems


def test_status_warns_before_a_role_expires(repo: Repo) -> None:
    webroot = repo.webroot
    now = datetime.datetime.now(datetime.UTC)
    assert tufstatus.status(webroot, now).problems == []
    problems = tufstatus.status(webroot, now + datetime.timedelta(hours=19)).problems
    assert problems == [p for p in problems if p.startswith("timestamp")] != []
    problems = tufstatus.status(webroot, now, warn=datetime.timedelta(days=400)).problems
    assert {p.split()[0] for p in problems} == {"root", "targets"}
    result = repo.run("tuf", "status", webroot, "--warn-days", "400", "--json")
    assert result.code == 5
    assert json.loads(result.out)["ok"] is False
