"""A TUF repository beside a test webroot, written with Rampart's own tools
(rampart.release.tufrepo, rampart.contracts.tufrepo): keys on disk, a 2-of-3 root,
one targets key, one online key (snapshot, timestamp, channels)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer

from rampart.contracts import tuf
from rampart.contracts import tufrepo as repo
from rampart.contracts.version import parse_version
from rampart.release import tufrepo

PASSWORD = b"correct horse"


def make_keys(directory: Path) -> tuple[tufrepo.Keys, dict[str, list[Signer]]]:
    """Three root keys (threshold 2), one targets key, one online key (snapshot,
    timestamp and channels); the signers by role ("root": all three)."""
    directory.mkdir(parents=True)
    signers: dict[str, list[Signer]] = {}
    public: dict[str, list[Any]] = {}
    for role, count in (("root", 3), ("targets", 1), ("online", 1)):
        for n in range(count):
            path = directory / f"{role}-{n}.key"
            public.setdefault(role, []).append(tufrepo.generate_key(path, PASSWORD))
            signers.setdefault(role, []).append(repo.load_signer(path, PASSWORD))
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


@dataclass
class TufRepo:
    """A repository in `webroot`/tuf and the keys that sign it."""

    webroot: Path
    keys: tufrepo.Keys
    signers: dict[str, list[Signer]]
    heads: dict[tuple[str, str], tuf.ChannelHead] = field(default_factory=dict)

    @classmethod
    def create(cls, webroot: Path, keydir: Path) -> TufRepo:
        keys, signers = make_keys(keydir)
        webroot.mkdir(parents=True, exist_ok=True)
        tufrepo.create(webroot, keys, {**signers, "root": signers["root"][:2]})
        return cls(webroot, keys, signers)

    @property
    def directory(self) -> Path:
        return repo.metadata_dir(self.webroot)

    def root(self) -> bytes:
        """The first root: what a device pins."""
        return (self.directory / "1.root.json").read_bytes()

    def release(self, os_name: str, version: str) -> None:
        """Add the published release `version` as targets."""
        tufrepo.add_release(self.webroot, os_name, parse_version(version), self.signers)

    def head(
        self,
        os_name: str,
        channel: str,
        version: str | None,
        rollout: str | None = None,
        percent: float = 0.0,
        state: tuf.RolloutState = tuf.RolloutState.ACTIVE,
    ) -> None:
        """Sign the channel head of `channel` (as the server's channels key does)."""
        self.heads[(os_name, channel)] = tuf.ChannelHead(
            os_name,
            channel,
            version,
            rollout,
            tuf.buckets_of(percent),
            state if rollout is not None else tuf.RolloutState.NONE,
        )
        repo.sign_channels(self.webroot, self.heads.values(), self.signers)

    def timestamp(self, lifetime: datetime.timedelta | None = None) -> None:
        repo.refresh_timestamp(self.webroot, self.signers, lifetime=lifetime)

    def state(self) -> dict[str, bytes]:
        """Every metadata file: to serve an older state again (rollback, freeze)."""
        return {p.name: p.read_bytes() for p in self.directory.iterdir() if p.is_file()}

    def restore(self, state: dict[str, bytes]) -> None:
        """Serve `state` again (what a malicious mirror does)."""
        for path in self.directory.iterdir():
            if path.is_file() and path.name not in state:
                path.unlink()
        for name, data in state.items():
            (self.directory / name).write_bytes(data)
