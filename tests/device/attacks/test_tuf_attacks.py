"""The attacks The Update Framework names (TUF 1.0, "Goals": protection against key
compromise and the attacks of section 1.5.2), each against a device in TUF mode.

Every test serves a real repository written with Rampart's tools (tests/tufkit.py)
from a hostile HTTPS server (tests/device/hostile.py) that misbehaves on chosen
paths, runs the real client, and asserts the refusal, its error class (its exit
code) and that neither the slots nor the ESP changed. The device's verified metadata
lives in its own directory, as on a machine (ngclient's local metadata)."""

from __future__ import annotations

import datetime
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, TargetFile, Targets, Timestamp

from rampart.contracts import tuf
from rampart.contracts import tufrepo as repo
from rampart.contracts.version import parse_version
from rampart.device import update
from rampart.errors import (
    FreezeError,
    OfferError,
    RemoteDataError,
    RollbackAttackError,
    TransportError,
    VerificationError,
)
from rampart.release import tufrepo
from rampart.testbed.services import Pki
from tests.conftest import KeyPair, run_cli
from tests.device.conftest import OS, DeviceDirs, make_device, make_release, publish
from tests.device.hostile import Behaviour, body, endless, hostile_server
from tests.tufkit import TufRepo

RUNNING = "5.0.0-alpha.1"
OFFERED = "5.0.0-alpha.3"
NEWER = "5.0.0-alpha.4"
MACHINE_ID = "0123456789abcdef0123456789abcdef"  # make_device's
CORE_PATH = f"/dist/{OFFERED}/{OS}-core"
TUF_CONFIG = '\n[trust]\nmode = "tuf"\nmetadata_dir = "{root}/tuf"\n'


@pytest.fixture
def repository(tmp_path: Path, vendor: KeyPair, webroot_dir: Path) -> TufRepo:
    """Release OFFERED, published (minisign) and signed as targets; channel stable
    points at it."""
    publish(webroot_dir, vendor, make_release(tmp_path / "rel", OFFERED))
    tuf_repo = TufRepo.create(webroot_dir, tmp_path / "keys")
    tuf_repo.release(OS, OFFERED)
    tuf_repo.head(OS, "stable", OFFERED)
    return tuf_repo


def tuf_device(
    tmp_path: Path, vendor: KeyPair, pki: Pki, url: str, tuf_repo: TufRepo, extra: str = ""
) -> DeviceDirs:
    """A device in TUF mode that pins the repository's first root."""
    root = tmp_path / "device"
    device = make_device(
        root, vendor, pki.ca.cert, url, RUNNING, extra_config=extra + TUF_CONFIG.format(root=root)
    )
    (device.remote_dir / "root.json").write_bytes(tuf_repo.root())
    return device


def run(device: DeviceDirs) -> update.UpdateResult:
    dev = device.open()
    return update.update(dev, update.make_fetcher(dev))


def refused(device: DeviceDirs, exception: type[Exception], match: str) -> None:
    """One update run: refused with `exception`, and nothing on the disk changed."""
    before = device.state()
    with pytest.raises(exception, match=match):
        run(device)
    assert device.state() == before
    assert not (device.run_dir / "update-ready").exists()


def attack(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    tuf_repo: TufRepo,
    behaviours: dict[str, Behaviour],
    exception: type[Exception],
    match: str,
    extra: str = "",
) -> DeviceDirs:
    with hostile_server(tuf_repo.webroot, pki.server.cert, pki.server.key, behaviours) as url:
        device = tuf_device(tmp_path, vendor, pki, url, tuf_repo, extra)
        refused(device, exception, match)
    return device


def test_tuf_mode_installs_a_release_the_targets_role_signed(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    with hostile_server(repository.webroot, pki.server.cert, pki.server.key, {}) as url:
        device = tuf_device(tmp_path, vendor, pki, url, repository)
        # The minisign signatures are not what a TUF device trusts: gone, it updates.
        for sig in (repository.webroot / "dist" / OFFERED).glob("*.sig"):
            sig.unlink()
        result = run(device)
    assert result.outcome == update.Outcome.UPDATED
    assert f"core_{OFFERED}" in device.lvs()
    assert (tmp_path / "device" / "tuf" / "timestamp.json").is_file()


def test_arbitrary_software_a_release_the_targets_role_never_signed(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """The vendor's minisign key signed NEWER, but the release keys never made it a
    target, and no signed channel head names a version (the server's offer rules)."""
    publish(repository.webroot, vendor, make_release(tmp_path / "rel4", NEWER))
    repository.heads.clear()
    repo.sign_channels(repository.webroot, [], repository.signers)
    attack(tmp_path, vendor, pki, repository, {}, VerificationError, "arbitrary software")


def test_arbitrary_software_payload_bytes_replaced(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """The server swaps the Core for other bytes of the same length."""
    core = (repository.webroot / CORE_PATH.lstrip("/")).read_bytes()
    forged = bytes(b ^ 0xFF for b in core[:4096]) + core[4096:]
    attack(
        tmp_path,
        vendor,
        pki,
        repository,
        {CORE_PATH: body(forged)},
        VerificationError,
        "digest is not the one the release keys signed",
    )


def test_rollback_attack_older_metadata_is_refused(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """The device trusts a state; a mirror then serves an older one."""
    old = repository.state()
    repository.timestamp()
    with hostile_server(repository.webroot, pki.server.cert, pki.server.key, {}) as url:
        device = tuf_device(tmp_path, vendor, pki, url, repository)
        device.set_running(OFFERED)  # up to date: the metadata is still checked
        assert run(device).outcome == update.Outcome.UP_TO_DATE
        repository.restore(old)
        refused(device, RollbackAttackError, "rollback")
        code = run_cli("update", *device.argv()).code
    assert code == RollbackAttackError.exit_code == 14


def test_indefinite_freeze_expired_timestamp_is_refused_and_reported(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    repository.timestamp(lifetime=datetime.timedelta(seconds=-60))
    posts: list[tuple[str, dict[str, str], bytes]] = []
    with hostile_server(repository.webroot, pki.server.cert, pki.server.key, {}, posts) as url:
        device = tuf_device(tmp_path, vendor, pki, url, repository)
        refused(device, FreezeError, "indefinite freeze")
        assert run_cli("update", *device.argv()).code == FreezeError.exit_code == 13
    report = json.loads(posts[-1][2])
    assert report["outcome"] == "failure"
    assert "indefinite freeze" in report["error"]


def test_endless_data_payload_longer_than_its_signed_length(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    attack(
        tmp_path, vendor, pki, repository, {CORE_PATH: endless}, RemoteDataError, "exceeds the cap"
    )


def test_endless_data_metadata(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """A timestamp larger than ngclient's cap for it (16 KiB) is cut there."""
    attack(
        tmp_path,
        vendor,
        pki,
        repository,
        {"/tuf/timestamp.json": endless},
        RemoteDataError,
        "cap of 16384",
    )


def test_slow_retrieval_metadata(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    attack(
        tmp_path,
        vendor,
        pki,
        repository,
        {"/tuf/timestamp.json": trickle_small},
        TransportError,
        "too slow",
        extra="min_speed = 1000\nstall_window = 1\n",
    )


def trickle_small(handler: BaseHTTPRequestHandler) -> None:
    """Announce a timestamp's size, then send one byte every 0.2 s."""
    handler.send_response(200)
    handler.send_header("Content-Length", "4000")
    handler.end_headers()
    for _ in range(50):
        try:
            handler.wfile.write(b" ")
            handler.wfile.flush()
        except OSError:
            return
        time.sleep(0.2)


def test_mix_and_match_targets_of_another_state(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """The snapshot names targets version N; the server serves another version's
    (validly signed) targets under N's name."""
    directory = repository.directory
    versions = repo.versions(directory, Targets.type)
    older = (directory / f"{versions[0]}.targets.json").read_bytes()
    path = f"/tuf/{versions[-1]}.targets.json"
    attack(
        tmp_path, vendor, pki, repository, {path: body(older)}, RollbackAttackError, "mix-and-match"
    )


def test_fast_forward_attack_recovered_by_rotating_the_timestamp_key(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """A stolen timestamp key signs version 2**30: the device trusts it. The root
    then rotates the timestamp key; the device must accept the new, lower versions."""
    stolen = repository.signers["timestamp"]
    with hostile_server(repository.webroot, pki.server.cert, pki.server.key, {}) as url:
        device = tuf_device(tmp_path, vendor, pki, url, repository)
        device.set_running(OFFERED)
        forged = Metadata[Timestamp].from_file(str(repository.directory / "timestamp.json"))
        forged.signed.version = 2**30
        repo.sign(forged, stolen)
        repo.write(repository.directory, forged)
        assert run(device).outcome == update.Outcome.UP_TO_DATE  # fast-forwarded
        # The recovery: a new root with a new timestamp key, a fresh timestamp v1.
        key_path = tmp_path / "keys" / "timestamp-new.key"
        new_key = tufrepo.generate_key(key_path, b"pw")
        new_signer = repo.load_signer(key_path, b"pw")
        root = repo.latest(repository.directory, Root.type)
        for keyid in list(root.signed.roles[Timestamp.type].keyids):
            root.signed.revoke_key(keyid, Timestamp.type)
        root.signed.add_key(new_key, Timestamp.type)
        root.signed.version += 1
        repo.sign(root, repository.signers["root"][:2])
        repo.write(repository.directory, root)
        (repository.directory / "timestamp.json").unlink()
        repository.signers["timestamp"] = [new_signer]
        repository.timestamp()
        assert run(device).outcome == update.Outcome.UP_TO_DATE
    trusted = json.loads((tmp_path / "device" / "tuf" / "timestamp.json").read_bytes())
    assert trusted["signed"]["version"] == 1


def test_wrong_software_another_os_payload_under_this_os_name(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """The release keys signed a target whose custom fields say another OS; it is
    served under this OS's path (what a vendor with two products could mix up)."""
    targets = repo.latest(repository.directory, Targets.type)
    path = tuf.payload_target(OS, parse_version(OFFERED), "core")
    target: TargetFile = targets.signed.targets[path]
    target.unrecognized_fields["custom"][tuf.CUSTOM]["os"] = "otheros"
    _resign_targets(repository, targets)
    attack(tmp_path, vendor, pki, repository, {}, VerificationError, "wrong software")


def test_wrong_software_efiboot_relabelled_as_core(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    targets = repo.latest(repository.directory, Targets.type)
    path = tuf.payload_target(OS, parse_version(OFFERED), "core")
    targets.signed.targets[path].unrecognized_fields["custom"][tuf.CUSTOM]["kind"] = "efiboot"
    _resign_targets(repository, targets)
    attack(tmp_path, vendor, pki, repository, {}, VerificationError, "signed kind")


def test_key_compromise_below_the_threshold_a_root_signed_by_one_key(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """One root key of 2-of-3 stolen: a root 2 it signs alone, handing the targets role
    to the thief, is refused; the device keeps root 1."""
    root = repo.latest(repository.directory, Root.type)
    root.signed.version = 2
    repo.sign(root, repository.signers["root"][2:])
    repo.write(repository.directory, root)
    attack(tmp_path, vendor, pki, repository, {}, VerificationError, "threshold")
    root_history = tmp_path / "device" / "tuf" / "root_history"
    assert sorted(p.name for p in root_history.iterdir()) == ["1.root.json"]


def test_offer_a_version_the_signed_channel_does_not_allow(
    tmp_path: Path, vendor: KeyPair, pki: Pki, repository: TufRepo
) -> None:
    """A compromised server offers a released version that its channel does not name."""
    publish(repository.webroot, vendor, make_release(tmp_path / "rel4", NEWER))
    repository.release(OS, NEWER)
    attack(tmp_path, vendor, pki, repository, {}, OfferError, "does not allow")


def _resign_targets(tuf_repo: TufRepo, targets: Metadata[Targets]) -> None:
    """Sign `targets` as a new version with the release key, then snapshot and timestamp."""
    targets.signed.version += 1
    repo.sign(targets, tuf_repo.signers["targets"])
    repo.write(tuf_repo.directory, targets)
    repo.publish_snapshot(tuf_repo.webroot, tuf_repo.signers)
