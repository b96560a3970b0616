"""`rampart serve --tuf-key`: the server holds the TUF repository's online keys, keeps
the metadata in <webroot>/tuf/ fresh and the delegated channels role in step with the
database, and serves both (rampart.server.signer, rampart.server.tuffiles).

The repositories are made here with the vendor's own tools (tests/tufkit.py) in a copy
of the session's published webroot; python-tuf's ngclient, unmodified, reads them back
from the running server."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import http.client
import json
import logging
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from rampart.contracts import tuf
from rampart.contracts import tufrepo as repo
from rampart.contracts.version import parse_version
from rampart.errors import LocalError
from rampart.release import tufrepo as release_tufrepo
from rampart.server import admin, audit, db, signer
from rampart.server.app import Settings, create_app
from rampart.server.rollout import ChannelState
from rampart.server.store import Store
from rampart.testbed import services
from tests.conftest import run_cli
from tests.server.conftest import OS, headers, machine_id
from tests.server.signing import SignedFleet
from tests.tufkit import PASSWORD, TufRepo

WAIT = 30.0  # seconds: the bound of every wait for a process
SIGNED_WITHIN = 5.0  # seconds: an administrative change is signed within this
HEAD = tuf.channel_target(OS, "stable")  # heads/clipos/stable.json


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> float:
    """Poll `condition` every 20 ms until it holds; the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def head(
    version: str | None,
    rollout: str | None = None,
    percent: float = 0.0,
    state: tuf.RolloutState = tuf.RolloutState.ACTIVE,
    channel: str = "stable",
) -> tuf.ChannelHead:
    if rollout is None:
        return tuf.ChannelHead(OS, channel, version)
    return tuf.ChannelHead(OS, channel, version, rollout, tuf.buckets_of(percent), state)


def signed_heads(webroot: Path) -> dict[str, tuf.ChannelHead]:
    return repo.channel_heads(webroot)


def first_round(webroot: Path) -> None:
    """Wait for the server's first round to end: the head of 1.0.0 signed, and the round
    recorded in the signer's state file, written once its snapshot and timestamp are (the
    channels role alone, written first, would let a test read the snapshot before)."""
    wait_for(
        "the first round",
        lambda: (
            signed_heads(webroot) == {HEAD: head("1.0.0")}
            and signer.read_state(webroot)["last_signed"] > 0
        ),
    )


def ngclient_head(url: str, root: bytes, directory: Path) -> tuple[tuf.ChannelHead, bytes]:
    """python-tuf's client, unmodified, from the server at `url` (trusting `root`): the
    stable channel's signed head and its file. Its connections are closed on return (a
    connection kept alive would hold up the server's graceful stop)."""
    directory.mkdir()
    updater = Updater(
        metadata_dir=str(directory),
        metadata_base_url=f"{url}/tuf/",
        target_dir=str(directory),
        target_base_url=f"{url}/",
        bootstrap=root,
        config=UpdaterConfig(prefix_targets_with_hash=False),
    )
    updater.refresh()
    info = updater.get_targetinfo(HEAD)
    assert info is not None
    data = Path(updater.download_target(info)).read_bytes()
    del updater
    gc.collect()  # its urllib3 pools close their connections
    return tuf.ChannelHead.from_custom(info.custom, HEAD), data


# --- fixtures: a repository beside a webroot, and the server holding its online keys ---------


@pytest.fixture
def tuf_repo(tmp_path: Path, published: Path) -> TufRepo:
    """The session's webroot (1.0.0, 1.0.1, 1.0.2; the default channel at 1.0.0), copied,
    with a new TUF repository: a 2-of-3 root, a targets key, one online key."""
    webroot = tmp_path / "webroot"
    shutil.copytree(published, webroot)
    return TufRepo.create(webroot, tmp_path / "tuf-keys")


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "tuf-password"
    path.write_bytes(PASSWORD + b"\n")
    path.chmod(0o600)
    return path


def online_key(tuf_repo: TufRepo) -> Path:
    return tuf_repo.webroot.parent / "tuf-keys" / "online-0.key"


@dataclass
class Signing:
    """A server in this process (TestClient) holding the repository's online keys."""

    repo: TufRepo
    store: Store
    client: TestClient
    token: str
    db_url: str
    fleet: SignedFleet

    @property
    def webroot(self) -> Path:
        return self.repo.webroot

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.client.request(method, path, headers=self.auth, json=body)
        assert response.status_code < 300, response.text
        return response.json()

    def check(self, mid: str) -> str:
        sent = self.fleet(mid).headers("version")  # signed: what it sends counts
        response = self.client.get(f"/update/v1/{OS}/version", headers=sent)
        assert response.status_code == 200, response.text
        return str(response.text.split('"')[1])

    @property
    def tuf_settings(self) -> signer.TufSettings:
        app = self.client.app
        assert isinstance(app, FastAPI)
        settings: signer.TufSettings | None = app.state.server.settings.tuf
        assert settings is not None
        return settings

    def sign_now(self) -> signer.Round:
        """A round in this thread, once the worker's own round (if any) is over."""
        while not (done := signer.sign_round(self.webroot, self.store, self.tuf_settings)).held:
            time.sleep(0.01)
        return done

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics", headers=self.auth).text
        return {
            name: float(value)
            for name, value in re.findall(r"^(rampart_tuf_\S+) (\S+)$", text, re.MULTILINE)
        }


@contextmanager
def signing_server(
    tuf_repo: TufRepo,
    password_file: Path,
    db_url: str,
    *,
    expiry: float = signer.DEFAULT_TIMESTAMP_EXPIRY,
    interval: float = signer.DEFAULT_INTERVAL,
    keys: bool = True,
) -> Iterator[Signing]:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, tuf_repo.webroot)
    token = store.create_token("tests", by=audit.cli_actor())
    settings = Settings(tuf_repo.webroot, flush_interval=0.02, cache_ttl=0.0)
    settings.new_machines_per_hour = 0
    if keys:
        options = signer.Options(
            (signer.KeySpec(None, online_key(tuf_repo)),), password_file, expiry, interval
        )
        settings.tuf = options.load(tuf_repo.webroot)
    try:
        with (
            TestClient(create_app(store, settings)) as client,
            tempfile.TemporaryDirectory(prefix="rampart-fleet-") as keys_dir,
        ):
            fleet = SignedFleet(store, Path(keys_dir))
            yield Signing(tuf_repo, store, client, token, db_url, fleet)
    finally:
        engine.dispose()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'server.sqlite'}"


# --- the channels role follows the database ---------------------------------------------------


def test_a_channel_change_is_signed_within_seconds(
    tuf_repo: TufRepo, password_file: Path, db_url: str
) -> None:
    """Every administrative change (the API, the command line in another process, an
    auto-halt) is signed as the channel's head within seconds, with an interval of a
    minute: the signer watches the database's generation counter."""
    with signing_server(tuf_repo, password_file, db_url) as server:
        webroot = server.webroot
        first_round(webroot)

        def signed(expected: dict[str, tuf.ChannelHead]) -> float:
            took = wait_for(f"signed {expected}", lambda: signed_heads(webroot) == expected)
            assert took < SIGNED_WITHIN
            return took

        for n in range(4):  # machines known before the rollout: their reports count
            assert server.check(machine_id(100 + n)) == "1.0.0"
        server.api("PUT", f"/admin/api/channels/{OS}/stable/version", {"version": "1.0.1"})
        signed({HEAD: head("1.0.1")})
        server.api(
            "POST",
            f"/admin/api/channels/{OS}/stable/rollout",
            # One failure halts it (below).
            {
                "version": "1.0.2",
                "percent": 12.5,
                "min_reports": 1,
                "min_failing": 1,
                "failure_threshold": 0,
            },
        )
        signed({HEAD: head("1.0.1", "1.0.2", 12.5)})
        server.api("POST", f"/admin/api/channels/{OS}/stable/rollout/raise", {"percent": 40})
        signed({HEAD: head("1.0.1", "1.0.2", 40)})
        server.api("POST", f"/admin/api/channels/{OS}/stable/rollout/pause")
        signed({HEAD: head("1.0.1", "1.0.2", 40, tuf.RolloutState.PAUSED)})
        server.api("POST", f"/admin/api/channels/{OS}/stable/rollout/resume")
        signed({HEAD: head("1.0.1", "1.0.2", 40, tuf.RolloutState.ACTIVE)})

        # The command line, another process's write to the same database.
        result = run_cli(
            "channel", "create", "beta", "--os", OS, "--version", "1.0.2",
            "--webroot", webroot, "--db", server.db_url,
        )  # fmt: skip
        assert result.code == 0, result.err
        beta = tuf.channel_target(OS, "beta")
        signed({HEAD: head("1.0.1", "1.0.2", 40), beta: head("1.0.2", channel="beta")})

        # An auto-halt, written by the report recorder.
        server.api("POST", f"/admin/api/channels/{OS}/stable/rollout/raise", {"percent": 99.99})
        signed({HEAD: head("1.0.1", "1.0.2", 99.99), beta: head("1.0.2", channel="beta")})
        halted = next(
            m for m in (machine_id(100 + n) for n in range(4)) if server.check(m) == "1.0.2"
        )
        body = b'{"from": "1.0.1", "to": "1.0.2", "outcome": "failure", "error": "x"}'
        response = server.client.post(
            f"/update/v1/{OS}/report",
            headers=server.fleet(halted).headers("report", body),
            content=body,
        )
        assert response.status_code == 200, response.text
        signed(
            {
                HEAD: head("1.0.1", "1.0.2", 99.99, tuf.RolloutState.HALTED),
                beta: head("1.0.2", channel="beta"),
            }
        )

    # What was signed verifies through the delegation, and each head's file is its bytes.
    directory = repo.metadata_dir(webroot)
    targets = repo.latest(directory, Targets.type)
    channels = repo.latest(directory, tuf.CHANNELS_ROLE)
    targets.verify_delegate(tuf.CHANNELS_ROLE, channels)
    for path, target in channels.signed.targets.items():
        data = (webroot / path).read_bytes()
        target.verify_length_and_hashes(data)
        assert data == tuf.ChannelHead.from_custom(target.custom, path).document()


def test_ngclient_reads_the_signed_channel_head_from_the_running_server(
    tmp_path: Path,
    tuf_repo: TufRepo,
    password_file: Path,
    pki: services.Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`rampart serve --tuf-key` over HTTPS: python-tuf's own client, unmodified, reads
    the channel head the server signed, and the head's `offer` is the server's own
    answer to each of 200 machines."""
    webroot = tuf_repo.webroot
    with services.RampartServe(
        webroot,
        tmp_path / "serve.log",
        tls=pki.server,
        options=[
            "--tuf-key",
            str(online_key(tuf_repo)),
            "--tuf-password-file",
            str(password_file),
            "--new-machines-per-hour",
            "0",
        ],
        timeout=WAIT,
    ) as server:
        result = run_cli(
            "channel", "rollout", "start", "stable", "--os", OS, "--version", "1.0.1",
            "--percent", "30", "--webroot", webroot,
        )  # fmt: skip
        assert result.code == 0, result.err
        expected = head("1.0.0", "1.0.1", 30)
        took = wait_for("the rollout signed", lambda: signed_heads(webroot) == {HEAD: expected})
        assert took < SIGNED_WITHIN
        time.sleep(1.2)  # the workers' channel caches follow within a second

        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca.cert))  # ngclient's urllib3 trusts it
        signed, data = ngclient_head(server.url, tuf_repo.root(), tmp_path / "client")
        assert signed == expected
        assert data == signed.document()

        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        conn = http.client.HTTPSConnection("localhost", server.port, timeout=WAIT, context=context)
        answers = {}
        try:
            for n in range(200):
                mid = machine_id(7000 + n)
                conn.request("GET", f"/update/v1/{OS}/version", headers=headers(mid))
                response = conn.getresponse()
                body = response.read()
                assert response.status == 200, body
                answers[mid] = body.decode().split('"')[1]
        finally:
            conn.close()
    assert answers == {mid: signed.offer(mid) for mid in answers}
    assert 30 <= sum(v == "1.0.1" for v in answers.values()) <= 90  # about 30 % of 200


# --- freshness ---------------------------------------------------------------------------------


def test_the_timestamp_is_resigned_before_it_expires(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    """A 4 s timestamp, a round every second: for 9 s, the timestamp on disk is never
    expired, and it is re-signed (new versions) at about half its lifetime."""
    directory = tuf_repo.directory
    root = Metadata[Root].from_file(str(directory / "1.root.json"))
    with signing_server(tuf_repo, password_file, sqlite_url(tmp_path), expiry=4, interval=1):

        def lifetime() -> datetime.timedelta:
            md = Metadata[Timestamp].from_file(str(directory / "timestamp.json"))
            return md.signed.expires - datetime.datetime.now(datetime.UTC)

        wait_for("the first round", lambda: lifetime() <= datetime.timedelta(seconds=4))
        seen: list[tuple[int, datetime.datetime]] = []
        end = time.monotonic() + 9
        while time.monotonic() < end:
            md = Metadata[Timestamp].from_file(str(directory / "timestamp.json"))
            now = datetime.datetime.now(datetime.UTC)
            root.verify_delegate(Timestamp.type, md)
            if not seen or seen[-1][0] != md.signed.version:
                assert not seen or md.signed.version > seen[-1][0]
                seen.append((md.signed.version, md.signed.expires))
            assert md.signed.expires - now > datetime.timedelta(seconds=0.5), seen
            assert md.signed.expires - now <= datetime.timedelta(seconds=4)
            time.sleep(0.05)
    assert len(seen) >= 4, seen  # one every ~2 s


def test_the_snapshot_and_the_channels_role_are_resigned_at_half_their_lifetime(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    """Metadata close to its expiry is signed again by the next round, nothing changed."""
    directory = tuf_repo.directory
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    for role in (tuf.CHANNELS_ROLE, Snapshot.type):
        md = repo.latest(directory, role)
        md.signed.expires = soon.replace(microsecond=0)
        repo.sign(md, tuf_repo.signers[role])
        repo.write(directory, md, role)
    before = {
        role: repo.versions(directory, role)[-1] for role in (tuf.CHANNELS_ROLE, Snapshot.type)
    }
    with signing_server(tuf_repo, password_file, sqlite_url(tmp_path)) as server:
        first_round(server.webroot)
        for role in (tuf.CHANNELS_ROLE, Snapshot.type):
            md = repo.latest(directory, role)
            assert md.signed.version > before[role]
            assert md.signed.expires - datetime.datetime.now(datetime.UTC) > datetime.timedelta(
                days=6
            )
        # A round with nothing due signs nothing.
        assert server.sign_now().signed == ()
        # A snapshot alone close to its expiry: a new snapshot and timestamp, nothing else.
        channels = repo.versions(directory, tuf.CHANNELS_ROLE)
        snapshot = repo.latest(directory, Snapshot.type)
        snapshot.signed.expires = soon.replace(microsecond=0)
        repo.sign(snapshot, tuf_repo.signers[Snapshot.type])
        repo.write(directory, snapshot)
        assert server.sign_now().signed == (Snapshot.type, Timestamp.type)
        assert repo.versions(directory, Snapshot.type)[-1] == snapshot.signed.version + 1
        assert repo.versions(directory, tuf.CHANNELS_ROLE) == channels


# --- several writers ---------------------------------------------------------------------------


def test_a_round_is_skipped_while_another_writer_holds_the_lock(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    with signing_server(tuf_repo, password_file, sqlite_url(tmp_path)) as server:
        first_round(server.webroot)
        settings = server.tuf_settings
        server.api(
            "POST", f"/admin/api/channels/{OS}/stable/rollout", {"version": "1.0.1", "percent": 5}
        )
        with repo.locked(server.webroot) as held:
            assert held
            files_before = sorted(p.name for p in tuf_repo.directory.iterdir())
            assert signer.sign_round(server.webroot, server.store, settings) == signer.Round(False)
            time.sleep(1.5)  # the worker's own signer skips its rounds too
            assert sorted(p.name for p in tuf_repo.directory.iterdir()) == files_before
        wait_for(
            "signed once the lock is free",
            lambda: signed_heads(server.webroot) == {HEAD: head("1.0.0", "1.0.1", 5)},
            5,
        )


def verify_repository(directory: Path, seen: dict[str, bytes], timestamps: list[int]) -> None:
    """Every metadata file is valid Metadata signed by the keys its delegator lists; a
    versioned file never changes once written; the timestamp's version only grows."""
    root = Metadata[Root].from_file(str(directory / "1.root.json"))
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue  # the lock, the state file, files being written
        data = path.read_bytes()
        md = Metadata[Any].from_bytes(data)
        if path.name == "timestamp.json":
            root.verify_delegate(Timestamp.type, md)
            assert md.signed.version >= (timestamps[-1] if timestamps else 0)
            timestamps.append(md.signed.version)
            continue
        number, role, _ = path.name.split(".")
        assert md.signed.version == int(number), path.name
        if path.name in seen:
            assert seen[path.name] == data, f"{path.name} was rewritten"
            continue
        seen[path.name] = data
        if role == tuf.CHANNELS_ROLE:
            targets = repo.latest(directory, Targets.type)
            targets.verify_delegate(tuf.CHANNELS_ROLE, md)
        else:
            root.verify_delegate(role, md)


def test_concurrent_rounds_never_corrupt_the_metadata(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    """Eight signers (threads: one flock each, as workers have) racing for 3 s, each
    round re-signing the timestamp, while the rollout is raised: a reader never sees an
    invalid file, and no version is written twice. (Without the lock, two writers share
    a temporary file name and a version number, and this fails.)"""
    directory = tuf_repo.directory
    with signing_server(tuf_repo, password_file, sqlite_url(tmp_path)) as server:
        first_round(server.webroot)
        racing = dataclasses.replace(
            server.tuf_settings,
            timestamp_lifetime=datetime.timedelta(0),  # always due
        )
        seen: dict[str, bytes] = {}
        timestamps: list[int] = []
        errors: list[BaseException] = []
        rounds: list[signer.Round] = []
        end = time.monotonic() + 3

        def race() -> None:
            while time.monotonic() < end and not errors:
                try:
                    rounds.append(signer.sign_round(server.webroot, server.store, racing))
                except BaseException as exc:
                    errors.append(exc)
                time.sleep(0.001)

        def read() -> None:
            while time.monotonic() < end and not errors:
                try:
                    verify_repository(directory, seen, timestamps)
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=race) for _ in range(8)]
        threads.append(threading.Thread(target=read))
        for thread in threads:
            thread.start()
        path = f"/admin/api/channels/{OS}/stable/rollout"
        server.api("POST", path, {"version": "1.0.1", "percent": 1})
        last = 1
        while time.monotonic() < end - 0.5:
            last += 1
            server.api("POST", path + "/raise", {"percent": last})
            time.sleep(0.05)
        for thread in threads:
            thread.join()
        assert not errors, repr(errors[0])
        assert sum(r.held for r in rounds) > 20 and any(not r.held for r in rounds)
        done = server.sign_now()
        assert signed_heads(server.webroot) == {HEAD: head("1.0.0", "1.0.1", last)}, done
    for role in (Snapshot.type, tuf.CHANNELS_ROLE):
        versions = repo.versions(directory, role)
        assert versions == list(range(1, len(versions) + 1)), (role, versions)
    verify_repository(directory, seen, timestamps)


def test_two_workers_never_corrupt_the_metadata(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    """`--workers 2`, a 4 s timestamp re-signed every 2 s and a rollout raised 40 times:
    every file read meanwhile is valid metadata, no version is written twice, versions
    grow one by one, and the last head signed is the database's."""
    webroot, directory = tuf_repo.webroot, tuf_repo.directory
    token = json.loads(run_cli("token", "create", "t", "--webroot", webroot, "--json").out)["token"]
    seen: dict[str, bytes] = {}
    timestamps: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                verify_repository(directory, seen, timestamps)
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)
                return

    with services.RampartServe(
        webroot,
        tmp_path / "serve.log",
        workers=2,
        options=[
            "--tuf-key",
            str(online_key(tuf_repo)),
            "--tuf-password-file",
            str(password_file),
            "--tuf-timestamp-expiry",
            "4",
            "--tuf-interval",
            "1",
        ],
        timeout=WAIT,
    ) as server:
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            path = f"/admin/api/channels/{OS}/stable/rollout"
            for percent in range(1, 41):
                body = {"version": "1.0.1", "percent": percent}
                conn.request(
                    "POST", path if percent == 1 else path + "/raise", json.dumps(body), auth
                )
                response = conn.getresponse()
                assert response.status == 200, response.read()
                response.read()
                time.sleep(0.15)
            conn.close()
            expected = {HEAD: head("1.0.0", "1.0.1", 40)}
            wait_for(
                "the last raise signed", lambda: signed_heads(webroot) == expected, SIGNED_WITHIN
            )
            time.sleep(3)  # two more timestamps, by either worker
        finally:
            stop.set()
            watcher.join()
        assert not errors, errors[0]

        # ngclient, unmodified, from the server: the same head.
        signed, _ = ngclient_head(server.url, tuf_repo.root(), tmp_path / "client")
        assert signed == expected[HEAD]

    for role in (Snapshot.type, tuf.CHANNELS_ROLE):
        versions = repo.versions(directory, role)
        assert versions == list(range(1, len(versions) + 1)), (role, versions)
    assert len(set(timestamps)) >= 3
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# --- the keys ----------------------------------------------------------------------------------


@pytest.fixture
def no_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`rampart serve` in this process up to uvicorn, which is not run: its calls."""
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *_, **kwargs: calls.append(kwargs))
    return calls


def test_a_wrong_key_refuses_to_start(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path, no_uvicorn: list[dict[str, Any]]
) -> None:
    webroot = tuf_repo.webroot
    keys = online_key(tuf_repo).parent
    stranger = tmp_path / "stranger.key"
    release_tufrepo.generate_key(stranger, PASSWORD)
    wrong_password = tmp_path / "wrong-password"
    wrong_password.write_text("battery staple\n")
    wrong_password.chmod(0o600)
    bare = tmp_path / "bare-webroot"
    bare.mkdir()
    db_url = sqlite_url(tmp_path)

    def serve(*options: str | Path, webroot: Path = webroot) -> tuple[int, str]:
        result = run_cli(
            "serve", "--webroot", webroot, "--db", db_url, "--tuf-password-file", password_file,
            *options,
        )  # fmt: skip
        return result.code, result.err

    for options, code, message in (
        (["--tuf-key", keys / "root-0.key"], 3, "not a channels key of this repository"),
        (["--tuf-key", f"snapshot={keys / 'targets-0.key'}"], 3, "not a snapshot key"),
        (["--tuf-key", f"timestamp={stranger}"], 3, "not a timestamp key"),
        (["--tuf-key", f"snapshot={online_key(tuf_repo)}"], 3, "the channels role needs 1 key"),
        (["--tuf-key", f"oracle={online_key(tuf_repo)}"], 2, "unknown role 'oracle'"),
        (["--tuf-key", tmp_path / "missing.key"], 3, "TUF key not found"),
        (
            [
                "--tuf-key",
                online_key(tuf_repo),
                "--tuf-timestamp-expiry",
                "3",
                "--tuf-interval",
                "1",
            ],
            2,
            "at least 4 times",
        ),
        (["--tuf-interval", "0", "--tuf-key", online_key(tuf_repo)], 2, "above 0"),
    ):
        got, err = serve(*options)
        assert (got, message in err) == (code, True), (options, err)
        assert err.count("\n") == 1 or code == 2, err  # one line (argparse adds its usage)
    code, err = serve("--tuf-key", online_key(tuf_repo), webroot=bare)
    assert (code, "no TUF repository" in err, err.count("\n")) == (3, True, 1), err
    result = run_cli(
        "serve", "--webroot", webroot, "--db", db_url, "--tuf-key", online_key(tuf_repo),
        "--tuf-password-file", wrong_password,
    )  # fmt: skip
    assert (result.code, "cannot open the TUF key" in result.err) == (3, True), result.err
    (tuf_repo.directory / ".lock").mkdir()  # where the lock file must be: not writable
    code, err = serve("--tuf-key", online_key(tuf_repo))
    assert (code, "cannot open the repository's lock" in err) == (3, True), err
    (tuf_repo.directory / ".lock").rmdir()
    result = run_cli("serve", "--webroot", webroot, "--db", db_url, "--tuf-interval", "5")
    assert (result.code, "need --tuf-key" in result.err) == (2, True), result.err
    assert no_uvicorn == []  # nothing was started

    # The right key starts, and its options reach the workers through the environment.
    code, err = serve("--tuf-key", online_key(tuf_repo), "--tuf-interval", "2")
    assert (code, len(no_uvicorn)) == (0, 1), err


def test_each_role_may_have_its_own_key(tmp_path: Path, published: Path) -> None:
    """A repository whose channels, snapshot and timestamp keys differ: each --tuf-key
    ROLE=PATH is checked for its role, and a key without ROLE must serve all three."""
    webroot = tmp_path / "webroot"
    shutil.copytree(published, webroot)
    keydir = tmp_path / "keys"
    keydir.mkdir()
    public = {}
    signers = {}
    for role in ("root", "targets", "snapshot", "timestamp", tuf.CHANNELS_ROLE):
        public[role] = [release_tufrepo.generate_key(keydir / f"{role}.key", None)]
        signers[role] = [repo.load_signer(keydir / f"{role}.key", None)]
    keys = release_tufrepo.Keys(
        public["root"], public["targets"], public["snapshot"], public["timestamp"],
        channels=public[tuf.CHANNELS_ROLE],
    )  # fmt: skip
    release_tufrepo.create(webroot, keys, signers)
    specs = tuple(
        signer.KeySpec.parse(f"{role}={keydir / f'{role}.key'}")
        for role in ("snapshot", "timestamp", tuf.CHANNELS_ROLE)
    )
    loaded = signer.Options(specs).load(webroot)
    for role in signer.ONLINE_ROLES:
        assert [s.public_key.keyid for s in loaded.signers[role]] == [public[role][0].keyid]
    with pytest.raises(LocalError, match="not a snapshot key"):
        signer.Options((signer.KeySpec(None, keydir / "channels.key"),)).load(webroot)

    # The options pass to the workers through the environment, unchanged.
    options = signer.Options(specs, tmp_path / "pw", 600.0, 5.0)
    assert signer.Options.from_environment(options.to_environment()) == options
    assert signer.Options.from_environment({}) is None
    assert signer.KeySpec.parse("/keys/a=b.key") == signer.KeySpec(None, Path("/keys/a=b.key"))


# --- a stolen online key -----------------------------------------------------------------------


def test_compromised_server_channels_key_cannot_sign_payloads(
    tmp_path: Path, tuf_repo: TufRepo
) -> None:
    """Whoever holds the server (its online keys and its webroot) signs channels metadata
    that lists payloads: a release's Core replaced by other bytes, and a release the
    vendor never signed. The channels role is trusted for heads/*/* only: python-tuf's
    client takes a payload's target from the targets role (the vendor's offline key),
    never from the channels metadata, and the replaced Core fails its hashes."""
    webroot, directory = tuf_repo.webroot, tuf_repo.directory
    tuf_repo.release(OS, "1.0.0")
    tuf_repo.head(OS, "stable", "1.0.0")
    delegation = repo.latest(directory, Targets.type).signed.delegations
    assert delegation is not None and delegation.roles is not None
    role = delegation.roles[tuf.CHANNELS_ROLE]
    assert (role.paths, role.terminating) == ([tuf.CHANNEL_PATTERN], True)

    core = tuf.payload_target(OS, parse_version("1.0.0"), "core")
    vendor_target = repo.latest(directory, Targets.type).signed.targets[core]
    evil = b"a Core of the attacker's choosing"
    unsigned = tuf.payload_target(OS, parse_version("9.9.9"), "core")
    stolen = tuf_repo.signers["online"]  # the server's online key: channels, snapshot, timestamp
    channels: Metadata[Targets] = repo.latest(directory, tuf.CHANNELS_ROLE)
    for path in (core, unsigned, "dist/x", f"heads/{OS}/../../{core}"):
        channels.signed.targets[path] = TargetFile.from_data(path, evil, ["sha256"])
    channels.signed.version += 1
    repo.sign(channels, stolen)
    repo.write(directory, channels, tuf.CHANNELS_ROLE)
    repo.publish_snapshot(webroot, {Snapshot.type: stolen, Timestamp.type: stolen})
    for path in (core, unsigned):
        (webroot / path).parent.mkdir(parents=True, exist_ok=True)
        (webroot / path).write_bytes(evil)

    (tmp_path / "client").mkdir()
    with services.Nginx.static(tmp_path / "nginx", webroot) as nginx:
        updater = Updater(
            metadata_dir=str(tmp_path / "client"),
            metadata_base_url=f"{nginx.url}/tuf/",
            target_dir=str(tmp_path / "client"),
            target_base_url=f"{nginx.url}/",
            bootstrap=tuf_repo.root(),
            config=UpdaterConfig(prefix_targets_with_hash=False),
        )
        updater.refresh()  # the metadata itself is validly signed by the online keys
        assert updater.get_targetinfo(unsigned) is None
        assert updater.get_targetinfo("dist/x") is None
        info = updater.get_targetinfo(core)
        assert info is not None
        assert info.hashes == vendor_target.hashes  # the vendor's, not the channels role's
        assert info.hashes["sha256"] != hashlib.sha256(evil).hexdigest()
        with pytest.raises(LengthOrHashMismatchError):
            updater.download_target(info)
        channel_info = updater.get_targetinfo(HEAD)  # the channel heads still resolve
        assert channel_info is not None
        assert tuf.ChannelHead.from_custom(channel_info.custom, HEAD) == head("1.0.0")

    # The server's own signer never signs anything but channel heads: its next round
    # replaces the attacker's channels metadata by the heads of the database.
    heads = [signer.channel_head(ChannelState(OS, "stable", "1.0.0"))]
    repo.sign_channels(webroot, heads, tuf_repo.signers)
    assert list(repo.latest(directory, tuf.CHANNELS_ROLE).signed.targets) == [HEAD]


# --- serving the files -------------------------------------------------------------------------


def test_metadata_and_heads_are_served_as_files_and_nothing_else(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    webroot, directory = tuf_repo.webroot, tuf_repo.directory
    (tmp_path / "secret").write_text("not for clients")
    (directory / "9.link.json").symlink_to(tmp_path / "secret")
    with signing_server(tuf_repo, password_file, sqlite_url(tmp_path)) as server:
        first_round(webroot)
        client = server.client
        response = client.get("/tuf/timestamp.json")
        assert response.status_code == 200
        assert response.content == (directory / "timestamp.json").read_bytes()
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["content-type"] == "application/json"
        response = client.get("/tuf/1.root.json")
        assert response.content == tuf_repo.root()
        assert "cache-control" not in response.headers  # a versioned file never changes
        response = client.get(f"/{HEAD}")
        assert response.content == (webroot / HEAD).read_bytes() == head("1.0.0").document()
        assert response.headers["cache-control"] == "no-cache"
        response = client.head("/tuf/timestamp.json")
        assert (response.status_code, response.content) == (200, b"")
        for path in (
            "/tuf/",
            "/tuf",
            "/tuf/.lock",
            f"/tuf/{signer.STATE_FILE}",
            "/tuf/9.link.json",
            "/tuf/99.root.json",
            "/tuf/..%2F..%2Fserver.sqlite",
            "/tuf/%2e%2e",
            "/tuf/1.root.json.tmp",
            "/heads/",
            f"/heads/{OS}/",
            f"/heads/{OS}/stable",
            f"/heads/{OS}/nope.json",
            f"/heads/{OS}/..%2F..%2Ftuf%2F1.root.json",
            "/heads/..%2Ftuf/1.root.json",
            f"/heads/{OS}/.stable.json.tmp",
            f"/channels/{OS}/stable.json",
            "/channels/stable/update/v1/clipos/version",
        ):
            assert client.get(path).status_code == 404, path
        assert client.post("/tuf/timestamp.json").status_code == 405


def test_a_failed_round_is_logged_counted_and_retried_while_the_server_serves(
    tmp_path: Path,
    tuf_repo: TufRepo,
    password_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The channels cannot be read (a database outage): each round fails, logged as one
    line and counted on /metrics, the timestamp is kept fresh all the same (the heads
    signed last stay valid), and the server serves; once the database is back, the next
    round signs what changed meanwhile."""
    directory = tuf_repo.directory
    with signing_server(
        tuf_repo, password_file, sqlite_url(tmp_path), expiry=4, interval=1
    ) as server:
        first_round(server.webroot)
        metrics = server.metrics()
        timestamp = Metadata[Timestamp].from_file(str(directory / "timestamp.json")).signed
        expiry = 'rampart_tuf_expiry_timestamp_seconds{role="timestamp"}'
        assert metrics[expiry] == timestamp.expires.timestamp()
        assert 'rampart_tuf_expiry_timestamp_seconds{role="snapshot"}' in metrics
        assert 'rampart_tuf_expiry_timestamp_seconds{role="channels"}' in metrics
        last = metrics["rampart_tuf_last_signing_timestamp_seconds"]
        assert time.time() - 10 < last <= time.time()
        assert metrics["rampart_tuf_signing_failures_total"] == 0

        def outage() -> list[Any]:
            raise OperationalError("SELECT channels", {}, Exception("connection refused\nmore"))

        server.api(
            "POST", f"/admin/api/channels/{OS}/stable/rollout", {"version": "1.0.1", "percent": 50}
        )
        monkeypatch.setattr(server.store, "channels", outage)
        # (/metrics itself needs the database: the state file it reads, meanwhile.)
        wait_for("failures", lambda: signer.read_state(server.webroot)["failures"] >= 3)
        failures = [r for r in caplog.records if r.name == "rampart.server.signer"]
        assert failures and all(r.levelno == logging.ERROR for r in failures)
        for record in failures:
            message = record.getMessage()
            assert message.startswith("TUF signing failed (retried within 1 s): OperationalError")
            assert "\n" not in message
        # The timestamp was re-signed meanwhile (a 4 s lifetime, 3 s of failures).
        now = datetime.datetime.now(datetime.UTC)
        fresh = Metadata[Timestamp].from_file(str(directory / "timestamp.json")).signed
        assert fresh.version > timestamp.version and fresh.expires - now > datetime.timedelta(
            seconds=1
        )
        assert signer.read_state(server.webroot)["last_signed"] > last
        assert signed_heads(server.webroot) == {HEAD: head("1.0.0")}  # the last heads signed
        assert server.client.get("/tuf/timestamp.json").status_code == 200

        monkeypatch.undo()
        took = wait_for(
            "signed once the database is back",
            lambda: signed_heads(server.webroot) == {HEAD: head("1.0.0", "1.0.1", 50)},
        )
        assert took < SIGNED_WITHIN
        assert server.check(machine_id(1)) in ("1.0.0", "1.0.1")
        failed = server.metrics()["rampart_tuf_signing_failures_total"]
        time.sleep(2.5)
        assert server.metrics()["rampart_tuf_signing_failures_total"] == failed


def test_without_tuf_key_the_server_neither_signs_nor_serves_tuf(
    tmp_path: Path, tuf_repo: TufRepo, password_file: Path
) -> None:
    directory = tuf_repo.directory
    tuf_repo.head(OS, "stable", "1.0.0")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with signing_server(tuf_repo, password_file, sqlite_url(tmp_path), keys=False) as server:
        app = server.client.app
        assert isinstance(app, FastAPI) and app.state.server.signer is None
        server.api(
            "POST", f"/admin/api/channels/{OS}/stable/rollout", {"version": "1.0.1", "percent": 50}
        )
        time.sleep(1.5)
        for path in ("/tuf/1.root.json", "/tuf/timestamp.json", f"/{HEAD}"):
            assert server.client.get(path).status_code == 404, path
        assert "rampart_tuf" not in server.client.get("/metrics", headers=server.auth).text
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
