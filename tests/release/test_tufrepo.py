"""The TUF repository beside a webroot (rampart.release.tufrepo), read back by
python-tuf's own client, unmodified: ngclient's `Updater` given the root, over HTTP
from nginx (tests' services), downloads every target of a Rampart repository."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from rampart.contracts import cmdline, pe, tuf
from rampart.contracts.version import parse_version
from rampart.errors import ConflictError
from rampart.release import tufrepo
from rampart.testbed import services
from tests.conftest import KeyPair
from tests.device.conftest import OS, make_release, publish

PASSWORD = b"correct horse"
Repository = tuple[Path, dict[str, list[Signer]]]  # the webroot, the signers by role


def make_keys(directory: Path) -> tuple[tufrepo.Keys, dict[str, list[Signer]]]:
    """Three root keys (threshold 2), one targets key, one online key (snapshot,
    timestamp and channels); the signers by role ("root": the first two)."""
    directory.mkdir()
    signers: dict[str, list[Signer]] = {}
    public: dict[str, list[Any]] = {}
    for role, count in (("root", 3), ("targets", 1), ("online", 1)):
        for n in range(count):
            path = directory / f"{role}-{n}.key"
            public.setdefault(role, []).append(tufrepo.generate_key(path, PASSWORD))
            signers.setdefault(role, []).append(tufrepo.load_signer(path, PASSWORD))
    keys = tufrepo.Keys(
        root=public["root"],
        targets=public["targets"],
        snapshot=public["online"],
        timestamp=public["online"],
        root_threshold=2,
        channels=public["online"],
    )
    for role in ("snapshot", "timestamp", tuf.CHANNELS_ROLE):
        signers[role] = signers["online"]
    return keys, signers


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
