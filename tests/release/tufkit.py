"""A TUF repository beside a webroot, made with the `rampart tuf` verbs, and python-tuf's
own client to judge it: ngclient's `Updater`, unmodified, reading the webroot's files
through a local fetcher (ngclient's documented extension point) instead of HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from rampart.contracts import tuf
from rampart.contracts.version import parse_version
from tests.conftest import KeyPair, Result, run_cli
from tests.device.conftest import OS, make_release, publish

PASSWORD = "correct horse battery staple"
ENV = {"RAMPART_TUF_PASSWORD": PASSWORD}
BASE = "http://webroot.invalid/"


class LocalFetcher(FetcherInterface):
    """Serves `webroot`'s files for BASE's URLs; 404 for anything missing."""

    def __init__(self, webroot: Path) -> None:
        self.webroot = webroot

    def _fetch(self, url: str) -> Iterator[bytes]:
        assert url.startswith(BASE), url
        path = self.webroot / url.removeprefix(BASE)
        if not path.is_file():
            raise DownloadHTTPError(f"{url}: not found", 404)
        return iter([path.read_bytes()])


@dataclass
class Client:
    """A device's view of the repository: python-tuf's Updater with its trusted
    metadata kept in `directory` between refreshes, first trusting `bootstrap`."""

    directory: Path
    webroot: Path
    bootstrap: bytes
    started: bool = False

    def updater(self) -> Updater:
        (self.directory / "metadata").mkdir(parents=True, exist_ok=True)
        (self.directory / "targets").mkdir(exist_ok=True)
        updater = Updater(
            metadata_dir=str(self.directory / "metadata"),
            metadata_base_url=f"{BASE}tuf/",
            target_dir=str(self.directory / "targets"),
            target_base_url=BASE,
            fetcher=LocalFetcher(self.webroot),
            bootstrap=None if self.started else self.bootstrap,
            # The targets are the webroot's own dist/ files, not hash-prefixed copies.
            config=UpdaterConfig(prefix_targets_with_hash=False),
        )
        self.started = True
        return updater

    def refresh(self) -> Updater:
        """Refresh as a device does; the Updater, for targets."""
        updater = self.updater()
        updater.refresh()
        return updater

    def download(self, version: str) -> None:
        """Refresh, then download and check both payloads of `version`."""
        updater = self.refresh()
        for kind in ("core", "efiboot"):
            path = tuf.payload_target(OS, parse_version(version), kind)
            info = updater.get_targetinfo(path)
            assert info is not None, path
            assert info.custom[tuf.CUSTOM]["version"] == version
            assert (
                Path(updater.download_target(info)).read_bytes()
                == (self.webroot / path).read_bytes()
            )

    def trusted(self, role: str) -> int:
        """The version of `role` this client trusts now."""
        data = json.loads((self.directory / "metadata" / f"{role}.json").read_bytes())
        version: int = data["signed"]["version"]
        return version


@dataclass
class Repo:
    """A webroot with release 1.0.0 and its TUF repository: root 2-of-3 (r0, r1, r2),
    targets t0, one online key o0 (snapshot, timestamp, channels); spare keys t1, r3, o1
    (with their .pub files); every key encrypted with PASSWORD."""

    webroot: Path
    keys: Path
    keyids: dict[str, str] = field(default_factory=dict)

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.keys / f"{name}.key.pub"

    def keyid(self, name: str) -> str:
        return self.keyids[name]

    @property
    def metadata(self) -> Path:
        return self.webroot / "tuf"

    def run(self, *argv: Any, env: dict[str, str] | None = None) -> Result:
        return run_cli(*argv, env={**ENV, **(env or {})})

    def ok(self, *argv: Any) -> dict[str, Any]:
        """Run a verb with --json; its JSON object (the verb must succeed)."""
        result = self.run(*argv, "--json")
        assert result.code == 0, (argv, result.err)
        loaded: dict[str, Any] = json.loads(result.out)
        return loaded

    def client(self, name: str = "device") -> Client:
        """A new client, bootstrapped with root version 1 as shipped."""
        return Client(
            self.webroot.parent / f"client-{name}",
            self.webroot,
            (self.metadata / "1.root.json").read_bytes(),
        )

    def publish(self, version: str, keypair: KeyPair) -> None:
        """Publish `version` into the webroot (minisign only, as `rampart publish`)."""
        publish(self.webroot, keypair, make_release(self.webroot.parent / f"r{version}", version))


def make_repository(tmp_path: Path, keypair: KeyPair) -> Repo:
    """A Repo made with the verbs: `tuf keygen` for each key, `tuf init`, `publish` and
    `tuf add-release` of 1.0.0."""
    webroot = tmp_path / "webroot"
    keys = tmp_path / "tuf-keys"
    keys.mkdir(parents=True)
    repo = Repo(webroot, keys)
    for name in ("r0", "r1", "r2", "r3", "t0", "t1", "o0", "o1"):
        repo.keyids[name] = repo.ok("tuf", "keygen", repo.key(name))["keyid"]
    publish(webroot, keypair, make_release(tmp_path / "r1.0.0", "1.0.0"))
    repo.ok(
        "tuf",
        "init",
        webroot,
        *("--root-key", repo.key("r0"), "--root-key", repo.key("r1")),
        *("--root-key", repo.key("r2"), "--threshold", "2"),
        *("--targets-key", repo.key("t0"), "--online-key", repo.key("o0")),
    )
    repo.ok(
        "tuf",
        "add-release",
        webroot,
        "1.0.0",
        *("--os", OS, "--targets-key", repo.key("t0"), "--online-key", repo.key("o0")),
    )
    return repo


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every path below `directory`, with its bytes (None for a directory)."""
    return {
        str(path.relative_to(directory)): None if path.is_dir() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
    }


def one_line(result: Result) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("rampart: error: "), result.err
    assert PASSWORD not in result.err + result.out
    return lines[0]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
