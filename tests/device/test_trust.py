"""A device in TUF mode (rampart.device.trust): the trust modes, the signed channel
head and the device's own bucket, root rotation and a revoked release key seen from
the device, the migration of a minisign device, the unprivileged fetch of metadata,
and what a server holding every online key can and cannot do."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from rampart.contracts import tuf
from rampart.contracts import tufrepo as repo
from rampart.contracts.version import parse_version
from rampart.device import installer, tufclient, update
from rampart.errors import (
    FormatError,
    FreezeError,
    LocalError,
    VerificationError,
)
from rampart.release import tufrepo
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair, run_cli
from tests.device.conftest import OS, DeviceDirs, make_device, make_release, publish
from tests.device.test_fetch import FETCH_USER, needs_root
from tests.tufkit import TufRepo

RUNNING = "5.0.0-alpha.1"
OFFERED = "5.0.0-alpha.3"
NEWER = "5.0.0-alpha.4"
MACHINE_ID = "0123456789abcdef0123456789abcdef"  # make_device's


@pytest.fixture
def repository(tmp_path: Path, vendor: KeyPair, served: Nginx) -> TufRepo:
    publish(served.root, vendor, make_release(tmp_path / "rel", OFFERED))
    tuf_repo = TufRepo.create(served.root, tmp_path / "keys")
    tuf_repo.release(OS, OFFERED)
    tuf_repo.head(OS, "stable", OFFERED)
    return tuf_repo


def tuf_device(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    tuf_repo: TufRepo | None,
    mode: str = "tuf",
    fetch_user: str = "",
) -> DeviceDirs:
    root = tmp_path / "device"
    device = make_device(
        root,
        vendor,
        pki.ca.cert,
        served.url,
        RUNNING,
        extra_config=f'\n[trust]\nmode = "{mode}"\nmetadata_dir = "{root}/tuf"\n',
        fetch_user=fetch_user,
    )
    if tuf_repo is not None:
        (device.remote_dir / "root.json").write_bytes(tuf_repo.root())
    return device


def run(device: DeviceDirs) -> update.UpdateResult:
    dev = device.open()
    return update.update(dev, update.make_fetcher(dev))


def next_release(tmp_path: Path, vendor: KeyPair, tuf_repo: TufRepo, version: str) -> None:
    publish(tuf_repo.webroot, vendor, make_release(tmp_path / f"rel-{version}", version))
    tuf_repo.release(OS, version)


# --- trust modes -------------------------------------------------------------------------


def test_auto_mode_without_a_root_stays_in_minisign_mode(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    publish(served.root, vendor, make_release(tmp_path / "rel", OFFERED))
    device = tuf_device(tmp_path, vendor, pki, served, None, mode="auto")
    assert device.open().tuf is None
    assert run(device).outcome == update.Outcome.UPDATED


def test_tuf_mode_without_a_root_is_an_error(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    device = tuf_device(tmp_path, vendor, pki, served, None, mode="tuf")
    with pytest.raises(LocalError, match="no root to start from"):
        device.open()
    assert run_cli("update", *device.argv()).code == LocalError.exit_code


def test_minisign_mode_ignores_a_pinned_root(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    device = tuf_device(tmp_path, vendor, pki, served, repository, mode="minisign")
    assert device.open().tuf is None


def test_migration_a_minisign_release_delivers_the_root(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    """A device in the field, in auto mode with no root, updates by minisign to a
    release whose Core carries root.json (its system configuration); from then on it
    is in TUF mode and refuses what the TUF repository did not sign."""
    device = tuf_device(tmp_path, vendor, pki, served, None, mode="auto")
    assert device.open().tuf is None
    assert run(device).outcome == update.Outcome.UPDATED
    # The new release boots: its Core's /usr/lib/rampart holds the root.
    (device.config_dir / "root.json").write_bytes(repository.root())
    device.set_running(OFFERED)
    (device.run_dir / "update-ready").unlink()
    dev = device.open()
    assert dev.tuf is not None and dev.tuf.bootstrap == device.config_dir / "root.json"
    assert run(device).outcome == update.Outcome.UP_TO_DATE
    # Now a release the vendor's minisign key signed, but not the release keys, is refused.
    publish(served.root, vendor, make_release(tmp_path / "rel4", NEWER))
    repository.head(OS, "stable", NEWER)
    with pytest.raises(VerificationError, match="arbitrary software"):
        run(device)
    # ngclient keeps the root it trusts: the pinned file is no longer needed.
    assert (tmp_path / "device" / "tuf" / "root.json").exists()
    assert device.open().tuf.bootstrap is None  # type: ignore[union-attr]


def test_install_refuses_a_pinned_root_not_signed_by_its_own_keys(
    tmp_path: Path, repository: TufRepo
) -> None:
    root = Metadata[Root].from_bytes(repository.root())
    root.signatures.clear()
    root.sign(repository.signers["root"][0])  # one of a threshold of 2
    with pytest.raises(FormatError, match="not a TUF root signed by its own keys"):
        tufclient.check_root(root.to_bytes(), "remote/root.json")
    tufclient.check_root(repository.root(), "remote/root.json")  # the real one is accepted
    assert installer.find_payload.__doc__  # the installer checks remote/root.json with it


# --- the signed channel head -----------------------------------------------------------


def test_the_device_computes_its_own_bucket_from_the_signed_rollout(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    """The channel points at OFFERED and rolls NEWER out to the machine's bucket; the
    server answers OFFERED (withholding the due update): the device installs NEWER."""
    next_release(tmp_path, vendor, repository, NEWER)
    percent = (tuf.bucket(MACHINE_ID, NEWER) + 1) / 100  # just inside
    repository.head(OS, "stable", OFFERED, rollout=NEWER, percent=percent)
    (served.root / "update/v1/clipos/version").write_text(f'version = "{OFFERED}"\n')
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    result = run(device)
    assert (result.outcome, result.latest) == (update.Outcome.UPDATED, parse_version(NEWER))


def test_a_machine_outside_the_signed_rollout_gets_the_channel_version(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    next_release(tmp_path, vendor, repository, NEWER)
    percent = tuf.bucket(MACHINE_ID, NEWER) / 100  # just outside
    repository.head(OS, "stable", OFFERED, rollout=NEWER, percent=percent)
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    assert run(device).latest == parse_version(OFFERED)


def test_a_paused_signed_rollout_is_offered_to_nobody(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    next_release(tmp_path, vendor, repository, NEWER)
    repository.head(OS, "stable", OFFERED, NEWER, 100.0, tuf.RolloutState.PAUSED)
    (served.root / "update/v1/clipos/version").write_text(f'version = "{OFFERED}"\n')
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    assert run(device).latest == parse_version(OFFERED)


# --- keys rotate; the device follows, nothing reinstalled ------------------------------------


def rotate_root(tuf_repo: TufRepo, change: str, new_key_path: Path) -> None:
    """Root N -> N+1 replacing the `change` role's keys by a new one, signed by a
    threshold of the old root keys (the root keys do not change here)."""
    new_key = tufrepo.generate_key(new_key_path, b"pw")
    root: Metadata[Root] = repo.latest(tuf_repo.directory, Root.type)
    for keyid in list(root.signed.roles[change].keyids):
        root.signed.revoke_key(keyid, change)
    root.signed.add_key(new_key, change)
    root.signed.version += 1
    repo.sign(root, tuf_repo.signers["root"][:2])
    repo.write(tuf_repo.directory, root)
    tuf_repo.signers[change] = [repo.load_signer(new_key_path, b"pw")]


def test_a_stolen_targets_key_is_revoked_and_its_release_refused(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    device.set_running(OFFERED)
    assert run(device).outcome == update.Outcome.UP_TO_DATE
    stolen = repository.signers["targets"]
    # The vendor rotates the targets key (root 2) and re-signs its targets.
    rotate_root(repository, Targets.type, tmp_path / "keys" / "targets-new.key")
    targets = repo.latest(repository.directory, Targets.type)
    targets.signed.version += 1
    repo.sign(targets, repository.signers["targets"])
    repo.write(repository.directory, targets)
    repo.publish_snapshot(repository.webroot, repository.signers)
    # The thief signs a release with the stolen key, as a new targets version.
    publish(served.root, vendor, make_release(tmp_path / "rel4", NEWER))
    release_signers = repository.signers
    repository.signers = {**release_signers, "targets": stolen}
    repository.release(OS, NEWER)
    repository.head(OS, "stable", NEWER)
    with pytest.raises(VerificationError, match="threshold"):
        run(device)
    # The device moved to root 2 on its own: nothing was reinstalled.
    history = tmp_path / "device" / "tuf" / "root_history"
    assert sorted(p.name for p in history.iterdir()) == ["1.root.json", "2.root.json"]


def test_root_rotation_threshold_of_old_and_new_keys(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    """Root 1 (keys A B C, 2 of 3) -> root 2 (keys C D E, 2 of 3), signed by 2 old and
    2 new keys: the device follows; the next release is signed as before."""
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    assert run(device).outcome == update.Outcome.UPDATED  # OFFERED, under root 1
    device.set_running(OFFERED)
    (device.run_dir / "update-ready").unlink()
    root: Metadata[Root] = repo.latest(repository.directory, Root.type)
    new_signers = []
    for name in ("root-d", "root-e"):
        key = tufrepo.generate_key(tmp_path / "keys" / f"{name}.key", b"pw")
        root.signed.add_key(key, Root.type)
        new_signers.append(repo.load_signer(tmp_path / "keys" / f"{name}.key", b"pw"))
    for signer in repository.signers["root"][:2]:
        root.signed.revoke_key(signer.public_key.keyid, Root.type)
    root.signed.version += 1
    repo.sign(root, [*repository.signers["root"][:2], *new_signers])
    repo.write(repository.directory, root)
    next_release(tmp_path, vendor, repository, NEWER)
    repository.head(OS, "stable", NEWER)
    result = run(device)
    assert (result.outcome, result.latest) == (update.Outcome.UPDATED, parse_version(NEWER))
    trusted = json.loads((tmp_path / "device" / "tuf" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 2


# --- a server holding every online key (snapshot, timestamp, channels) ------------------------


def test_compromised_server_with_every_online_key_can_choose_among_released_versions(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    """What it CAN do: point the channel at another released version (and delay, up to
    the timestamp's expiry: see the freeze tests). A released older version is never
    installed over a newer running one (the client never downgrades)."""
    next_release(tmp_path, vendor, repository, NEWER)
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    device.set_running(NEWER)
    repository.head(OS, "stable", OFFERED)  # the thief's choice, a released version
    (served.root / "update/v1/clipos/version").write_text(f'version = "{OFFERED}"\n')
    assert run(device).outcome == update.Outcome.UP_TO_DATE


def test_compromised_server_with_every_online_key_cannot_sign_a_payload(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    """What it CANNOT do: its channels key signs payload targets for NEWER (never
    released) and points the channel at it; the channels role may only sign channel
    heads, so the payloads are not targets and the device refuses them."""
    publish(served.root, vendor, make_release(tmp_path / "rel4", NEWER))
    channels: Metadata[Targets] = repo.latest(repository.directory, tuf.CHANNELS_ROLE)
    for kind in ("core", "efiboot"):
        path = tuf.payload_target(OS, parse_version(NEWER), kind)
        target = TargetFile.from_file(path, str(served.root / path), list(tuf.HASHES))
        channels.signed.targets[path] = target
    channels.signed.version += 1
    repo.sign(channels, repository.signers[tuf.CHANNELS_ROLE])
    repo.write(repository.directory, channels, tuf.CHANNELS_ROLE)
    repo.publish_snapshot(repository.webroot, repository.signers)
    repository.heads.clear()
    head = tuf.ChannelHead(OS, "stable", NEWER)
    path = tuf.channel_target(OS, "stable")
    head_target = repo.write_target_file(served.root, path, head.document())
    head_target.unrecognized_fields["custom"] = head.to_custom()
    channels = repo.latest(repository.directory, tuf.CHANNELS_ROLE)
    channels.signed.targets[path] = head_target
    channels.signed.version += 1
    repo.sign(channels, repository.signers[tuf.CHANNELS_ROLE])
    repo.write(repository.directory, channels, tuf.CHANNELS_ROLE)
    repo.publish_snapshot(repository.webroot, repository.signers)
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    before = device.state()
    with pytest.raises(VerificationError, match="arbitrary software"):
        run(device)
    assert device.state() == before


def test_compromised_server_can_delay_only_until_the_timestamp_expires(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    """It keeps serving an old snapshot with fresh timestamps: the device sees nothing
    new (the delay it can cause). Once it stops re-signing (or the real timestamp key
    is not its own any more), the timestamp expires and the device reports a freeze."""
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    device.set_running(OFFERED)
    assert run(device).outcome == update.Outcome.UP_TO_DATE
    repository.timestamp(lifetime=datetime.timedelta(seconds=2))
    assert run(device).outcome == update.Outcome.UP_TO_DATE
    time.sleep(2.5)
    with pytest.raises(FreezeError):
        run(device)


# --- the unprivileged fetch ----------------------------------------------------------------


@needs_root
def test_metadata_is_fetched_by_the_unprivileged_fetch_process(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    device = tuf_device(tmp_path, vendor, pki, served, repository, fetch_user=FETCH_USER)
    dev = device.open()
    fetcher = update.make_fetcher(dev)
    assert update.update(dev, fetcher).outcome == update.Outcome.UPDATED
    assert fetcher.last_credentials["uid"] != 0
    assert fetcher.last_credentials["cap_eff"].strip("0") == ""


def test_status_shows_the_trusted_root_and_the_timestamp_expiry(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, repository: TufRepo
) -> None:
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    argv = [*device.argv()[:2], *device.argv()[6:]]  # status takes no -r or -t
    before = run_cli("status", "--json", *argv)
    assert json.loads(before.out)["trust"] == {
        "mode": "tuf",
        "metadata_dir": str(tmp_path / "device" / "tuf"),
        "root_version": None,
    }
    assert run(device).outcome == update.Outcome.UPDATED
    after = run_cli("status", "--json", *argv)
    state = json.loads(after.out)["trust"]
    assert (state["root_version"], state["expired"]) == (1, False)
    assert state["timestamp_version"] >= 1
    text = run_cli("status", *argv).out
    assert "trust: tuf, TUF root 1, timestamp" in text


def test_a_minisign_device_never_loads_python_tuf() -> None:
    """python-tuf is imported only in TUF mode (device/tufclient.py): the update, status
    and command modules a minisign device runs load none of it."""
    import subprocess
    import sys

    code = (
        "import sys, rampart.device.update, rampart.device.status, rampart.commands.device; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tuf', 'securesystemslib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
