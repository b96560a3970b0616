"""The repository's online keys, held by `rampart serve --tuf-key`: the server keeps the
TUF metadata in `<webroot>/tuf/` fresh and the delegated `channels` role in step with
the database (docs/server.md "Signing the TUF metadata").

Each worker runs one `RepositorySigner` while it serves. A round, at start and then
every `interval` seconds, and within a second of any administrative change (the
database's generation counter, which every change and every auto-halt bumps):

1. takes the repository's write lock (`contracts.tufrepo.locked`, a non-blocking
   flock on `tuf/.lock`): when another worker holds it, this one skips the round and
   tries again a second later;
2. reads the channels and their rollouts from the database (the ChannelState the
   version check answers from) and signs them as channel heads
   (`contracts.tufrepo.sign_channels`: nothing is written when the signed heads say
   the same, unless the channels metadata has less than half its lifetime left);
3. publishes a new snapshot when the snapshot has less than half its lifetime left,
   or names an older version of a role than the newest one on disk;
4. re-signs the timestamp when it has less than half the configured lifetime left,
   more than that lifetime, or names an older snapshot than the newest one.

Steps 3 and 4 run even when step 2 fails (the database is down: the heads signed
last stay valid, and fresh). A round that fails is logged as one line and retried at
the next round; the server
keeps serving. What the rounds did (the last signing time, the failures) is kept in
`tuf/.signer.json`, for /metrics, whatever worker answers the scrape.

The parent process (`rampart serve`) checks the keys before any worker starts
(`Options.load`): the webroot must hold a repository whose lock opens, and each key
must be one the root metadata (snapshot, timestamp) or the targets metadata
(channels) lists for its role. The workers read the same options from the
environment (`Options.to_environment`) and load the keys again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from starlette.concurrency import run_in_threadpool
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from rampart.contracts import tuf, tufrepo
from rampart.contracts.version import parse_version
from rampart.errors import LocalError, RampartError, UsageError
from rampart.server.rollout import ChannelState, RolloutState
from rampart.server.store import Store

log = logging.getLogger(__name__)

ONLINE_ROLES = (tuf.CHANNELS_ROLE, Snapshot.type, Timestamp.type)
DEFAULT_TIMESTAMP_EXPIRY = 86400.0  # seconds
DEFAULT_INTERVAL = 60.0  # seconds between two rounds
WATCH = 1.0  # seconds between two reads of the generation counter
MIN_EXPIRY_INTERVALS = 4  # the timestamp lives at least this many intervals
STATE_FILE = ".signer.json"  # in tuf/, beside the lock; never served

# The workers' options, set by `rampart serve` for them.
KEYS_ENV = "RAMPART_TUF_KEYS"
PASSWORD_FILE_ENV = "RAMPART_TUF_PASSWORD_FILE"  # noqa: S105 - a variable's name
TIMESTAMP_EXPIRY_ENV = "RAMPART_TUF_TIMESTAMP_EXPIRY"
INTERVAL_ENV = "RAMPART_TUF_INTERVAL"
ENVIRONMENT = (KEYS_ENV, PASSWORD_FILE_ENV, TIMESTAMP_EXPIRY_ENV, INTERVAL_ENV)

_ROLE_PREFIX = re.compile(r"([a-z]+)=(.+)", re.DOTALL)


# --- the options and the keys ------------------------------------------------------------


@dataclass(frozen=True)
class KeySpec:
    """One `--tuf-key [ROLE=]PATH`: `role` None serves every online role."""

    role: str | None
    path: Path

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        match = _ROLE_PREFIX.fullmatch(text)
        if match is None:
            return cls(None, Path(text))
        role, path = match.groups()
        if role not in ONLINE_ROLES:
            raise UsageError(
                f"--tuf-key {text!r}: unknown role {role!r} (use {', '.join(ONLINE_ROLES)})"
            )
        return cls(role, Path(path))

    def roles(self) -> tuple[str, ...]:
        return ONLINE_ROLES if self.role is None else (self.role,)


@dataclass(frozen=True)
class TufSettings:
    """What a worker's signer needs: the signers by role, the timestamp's lifetime, the
    interval between two rounds and between two reads of the generation counter."""

    signers: Mapping[str, Sequence[Signer]]
    timestamp_lifetime: datetime.timedelta
    interval: float = DEFAULT_INTERVAL
    watch: float = WATCH


@dataclass(frozen=True)
class Options:
    """`rampart serve`'s --tuf-* options."""

    keys: tuple[KeySpec, ...]
    password_file: Path | None = None
    timestamp_expiry: float = DEFAULT_TIMESTAMP_EXPIRY
    interval: float = DEFAULT_INTERVAL

    def check(self) -> None:
        """UsageError unless the intervals make sense."""
        if not self.keys:
            raise UsageError("--tuf-key is required to sign the TUF metadata")
        if not 0 < self.interval <= 86400:
            raise UsageError("--tuf-interval must be more than 0 and at most 86400 seconds")
        if self.timestamp_expiry < MIN_EXPIRY_INTERVALS * self.interval:
            raise UsageError(
                f"--tuf-timestamp-expiry must be at least {MIN_EXPIRY_INTERVALS} times "
                "--tuf-interval (the timestamp is re-signed at half its lifetime)"
            )
        if self.timestamp_expiry > 365 * 86400:
            raise UsageError("--tuf-timestamp-expiry must be at most a year")

    def load(self, webroot: Path) -> TufSettings:
        """The signers, checked against the repository in `webroot`, whose lock must open
        (LocalError)."""
        self.check()
        password = tufrepo.read_password(self.password_file)
        signers = load_signers(webroot, self.keys, password)
        with tufrepo.locked(webroot, wait=False):  # LocalError: the directory is read-only
            pass
        return TufSettings(
            signers,
            datetime.timedelta(seconds=self.timestamp_expiry),
            self.interval,
            min(WATCH, self.interval),
        )

    def to_environment(self) -> dict[str, str]:
        """The options for the workers (absolute paths: a worker may start elsewhere)."""
        env = {
            KEYS_ENV: json.dumps([[k.role, str(k.path.absolute())] for k in self.keys]),
            TIMESTAMP_EXPIRY_ENV: repr(self.timestamp_expiry),
            INTERVAL_ENV: repr(self.interval),
        }
        if self.password_file is not None:
            env[PASSWORD_FILE_ENV] = str(self.password_file.absolute())
        return env

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Options | None:
        """The options `to_environment` wrote (None: no --tuf-key)."""
        if not environ.get(KEYS_ENV):
            return None
        keys = tuple(KeySpec(role, Path(path)) for role, path in json.loads(environ[KEYS_ENV]))
        password_file = environ.get(PASSWORD_FILE_ENV)
        return cls(
            keys,
            Path(password_file) if password_file else None,
            float(environ.get(TIMESTAMP_EXPIRY_ENV) or DEFAULT_TIMESTAMP_EXPIRY),
            float(environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL),
        )


def _read(directory: Path, role: str) -> tuple[Metadata[Any], str]:
    """The newest metadata of `role` and its file name (LocalError: none, or unreadable;
    FormatError: not TUF metadata)."""
    found = tufrepo.versions(directory, role)
    if not found:
        raise LocalError(f"{directory}: no {role} metadata: not a TUF repository")
    name = f"{found[-1]}.{role}.json"
    return tufrepo.read_metadata(directory / name), name


def listed_keys(webroot: Path) -> dict[str, tuple[set[str], int, str]]:
    """For each online role, the key ids the repository lists for it, its threshold and
    the file that lists them (LocalError: no repository, no channels role)."""
    directory = tufrepo.metadata_dir(webroot)
    if not (directory / "1.root.json").is_file():
        raise LocalError(
            f"{directory}: no TUF repository (1.root.json); `rampart tuf init` makes one"
        )
    root, root_name = _read(directory, Root.type)
    targets, targets_name = _read(directory, Targets.type)
    if tuf.CHANNELS_ROLE not in tufrepo.roles_of(targets.signed):
        raise LocalError(f"{directory / targets_name}: delegates no {tuf.CHANNELS_ROLE} role")
    listed = {}
    for role in ONLINE_ROLES:
        keyids, threshold = tufrepo.role_keys(root.signed, targets.signed, role)
        source = targets_name if role == tuf.CHANNELS_ROLE else root_name
        listed[role] = (set(keyids), threshold, source)
    _read(directory, tuf.CHANNELS_ROLE)
    _read(directory, Snapshot.type)
    return listed


def load_signers(
    webroot: Path, keys: Iterable[KeySpec], password: bytes | None
) -> dict[str, list[Signer]]:
    """The signers of each online role, each key checked to be one the repository
    lists for its role; LocalError for a key of another role or repository, or a role
    left without enough keys."""
    listed = listed_keys(webroot)
    signers: dict[str, dict[str, Signer]] = {role: {} for role in ONLINE_ROLES}
    for spec in keys:
        signer = tufrepo.load_signer(spec.path, password)
        keyid = signer.public_key.keyid
        for role in spec.roles():
            keyids, _, source = listed[role]
            if keyid not in keyids:
                raise LocalError(
                    f"{spec.path}: not a {role} key of this repository (its key id "
                    f"{keyid[:16]}... is not one {source} lists for {role})"
                )
            signers[role][keyid] = signer
    for role in ONLINE_ROLES:
        threshold = listed[role][1]
        if len(signers[role]) < threshold:
            raise LocalError(
                f"the {role} role needs {threshold} key(s), {len(signers[role])} given "
                f"(--tuf-key {role}=PATH)"
            )
    return {role: list(found.values()) for role, found in signers.items()}


# --- one round ---------------------------------------------------------------------------


def channel_head(channel: ChannelState) -> tuf.ChannelHead:
    """A channel of the database as the channels role signs it."""
    version = parse_version(channel.version).core if channel.version else None
    if channel.rollout_version is None:  # no rollout: its percentage and state say nothing
        return tuf.ChannelHead(channel.os, channel.name, version)
    return tuf.ChannelHead(
        channel.os,
        channel.name,
        version,
        parse_version(channel.rollout_version).core,
        tuf.buckets_of(channel.rollout_percent),
        RolloutState(channel.rollout_state),
    )


@dataclass(frozen=True)
class Round:
    """What a round did: `held` False if another writer held the lock (nothing done);
    the database's generation it signed; the roles it signed, in order."""

    held: bool
    generation: int | None = None
    signed: tuple[str, ...] = ()


def sign_round(webroot: Path, store: Store, settings: TufSettings) -> Round:
    """One round (blocking): under the repository's lock, sign what is due. The channel
    heads come first; the snapshot and the timestamp are kept fresh even when they
    cannot be signed (the database is down: devices keep the heads signed last). An
    error is counted in the state file, then raised."""
    with tufrepo.locked(webroot, wait=False) as held:
        if not held:
            return Round(False)
        now = datetime.datetime.now(datetime.UTC)
        error: Exception | None = None
        generation: int | None = None
        signed: tuple[str, ...] = ()
        try:
            generation, signed = _sign_heads(webroot, store, settings, now)
        except Exception as exc:  # raised below, once the timestamp is fresh
            error = exc
        try:
            signed += _keep_fresh(webroot, settings, now)
        except Exception:
            _record(webroot, signed=bool(signed), failed=True)
            raise
        _record(webroot, signed=bool(signed), failed=error is not None)
        if error is not None:
            raise error
        return Round(True, generation, tuple(dict.fromkeys(signed)))


def _sign_heads(
    webroot: Path, store: Store, settings: TufSettings, now: datetime.datetime
) -> tuple[int, tuple[str, ...]]:
    """The database's channels as the channels role's heads (and, if they changed, a
    snapshot and a timestamp); the same heads again when the channels metadata expires
    within half its lifetime. The generation is read first, so that a change committed
    meanwhile is signed by the next round."""
    generation = store.generation()
    heads = [channel_head(channel) for channel in store.channels()]
    if tufrepo.sign_channels(webroot, heads, settings.signers) is not None:
        return generation, (tuf.CHANNELS_ROLE, Snapshot.type, Timestamp.type)
    channels, _ = _read(tufrepo.metadata_dir(webroot), tuf.CHANNELS_ROLE)
    if not tufrepo.expiring(channels.signed, tuf.CHANNELS_ROLE, now):
        return generation, ()
    tufrepo.resign_channels(webroot, settings.signers, now)
    return generation, (tuf.CHANNELS_ROLE,)  # the snapshot follows (it names an older one)


def _keep_fresh(webroot: Path, settings: TufSettings, now: datetime.datetime) -> tuple[str, ...]:
    """A new snapshot, a new timestamp, when due; the roles signed."""
    directory = tufrepo.metadata_dir(webroot)
    signed: tuple[str, ...] = ()
    if _snapshot_due(directory, now):
        tufrepo.sign_snapshot(webroot, settings.signers, now)
        signed += (Snapshot.type,)
    if _timestamp_due(directory, settings.timestamp_lifetime, now):
        lifetime = settings.timestamp_lifetime
        tufrepo.sign_timestamp(webroot, settings.signers, lifetime=lifetime, now=now)
        signed += (Timestamp.type,)
    return signed


def _snapshot_due(directory: Path, now: datetime.datetime) -> bool:
    """The snapshot has less than half its lifetime left, or names an older version of
    a role than the newest on disk (a writer stopped between the two)."""
    snapshot, _ = _read(directory, Snapshot.type)
    if tufrepo.expiring(snapshot.signed, Snapshot.type, now):
        return True
    for role in (Targets.type, *tufrepo.delegated_roles(directory)):
        found = tufrepo.versions(directory, role)
        named = snapshot.signed.meta.get(f"{role}.json")
        if found and (named is None or named.version != found[-1]):
            return True
    return False


def _timestamp_due(directory: Path, lifetime: datetime.timedelta, now: datetime.datetime) -> bool:
    """The timestamp has less than half its lifetime left or more than all of it (signed
    with another lifetime), or names an older snapshot than the newest."""
    path = directory / "timestamp.json"
    if not path.exists():
        return True
    timestamp = tufrepo.read_metadata(path).signed
    left = timestamp.expires - now
    newest = tufrepo.versions(directory, Snapshot.type)[-1:]
    return left < lifetime / 2 or left > lifetime or [timestamp.snapshot_meta.version] != newest


# --- what the rounds did, for /metrics ------------------------------------------------------


def read_state(webroot: Path) -> dict[str, float]:
    """The state file: `last_signed` (UNIX time, 0: never), `failures` (rounds failed)."""
    path = tufrepo.metadata_dir(webroot) / STATE_FILE
    state = {"last_signed": 0.0, "failures": 0.0}
    try:
        found = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return state
    if isinstance(found, dict):
        for key in state:
            value = found.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                state[key] = float(value)
    return state


def _record(webroot: Path, *, signed: bool, failed: bool) -> None:
    """Note a round that signed or failed in the state file (under the lock)."""
    if not signed and not failed:
        return
    state = read_state(webroot)
    if failed:
        state["failures"] += 1
    if signed:
        state["last_signed"] = time.time()
    path = tufrepo.metadata_dir(webroot) / STATE_FILE
    tmp = path.with_name(f"{STATE_FILE}.tmp")
    try:
        tmp.write_text(
            json.dumps({"last_signed": state["last_signed"], "failures": int(state["failures"])})
        )
        tmp.replace(path)
    except OSError as exc:
        log.warning("%s: cannot write the signer's state: %s", path, exc.strerror)


def metric_lines(webroot: Path) -> list[str]:
    """The signer's Prometheus metrics: the expiry of each online role's metadata, the
    last time the server signed, the rounds that failed."""
    directory = tufrepo.metadata_dir(webroot)
    lines = [
        "# HELP rampart_tuf_expiry_timestamp_seconds When the newest metadata of each "
        "online TUF role expires (UNIX time).",
        "# TYPE rampart_tuf_expiry_timestamp_seconds gauge",
    ]
    for role in (Timestamp.type, Snapshot.type, tuf.CHANNELS_ROLE):
        try:
            if role == Timestamp.type:
                md = tufrepo.read_metadata(directory / "timestamp.json")
            else:
                md, _ = _read(directory, role)
        except RampartError:
            continue
        expires = md.signed.expires.timestamp()
        lines.append(f'rampart_tuf_expiry_timestamp_seconds{{role="{role}"}} {expires:.0f}')
    state = read_state(webroot)
    lines += [
        "# HELP rampart_tuf_last_signing_timestamp_seconds When the server last signed TUF "
        "metadata (UNIX time; 0: never).",
        "# TYPE rampart_tuf_last_signing_timestamp_seconds gauge",
        f"rampart_tuf_last_signing_timestamp_seconds {state['last_signed']:.3f}",
        "# HELP rampart_tuf_signing_failures_total Signing rounds that failed.",
        "# TYPE rampart_tuf_signing_failures_total counter",
        f"rampart_tuf_signing_failures_total {state['failures']:.0f}",
    ]
    return lines


# --- the worker's loop ---------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, RampartError) else f"{type(exc).__name__}: {first}"


class RepositorySigner:
    """A worker's signer: a round at start, every `interval`, and within `watch`
    seconds of a change of the database's generation counter."""

    def __init__(self, webroot: Path, store: Store, settings: TufSettings) -> None:
        self.webroot = webroot
        self.store = store
        self.settings = settings
        self.seen: int | None = None  # the generation of the last round done or failed
        self.next_round = 0.0  # when the next round is due by the clock (monotonic)
        self._stopping = False
        self._stopped: asyncio.Event | None = None  # made in the loop that runs it

    async def run(self) -> None:
        """Rounds until `stop`; the round in progress then completes."""
        self._stopped = stopped = asyncio.Event()
        while not self._stopping:
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), self.settings.watch)

    def stop(self) -> None:
        self._stopping = True
        if self._stopped is not None:
            self._stopped.set()

    async def tick(self) -> None:
        """A round if one is due (by the clock or a change); a failure is logged."""
        started = time.monotonic()
        generation = await self._generation()
        if started < self.next_round and (generation is None or generation == self.seen):
            return
        try:
            done = await run_in_threadpool(sign_round, self.webroot, self.store, self.settings)
        except Exception as exc:  # any failure: one line, and the next round tries again
            log.error(
                "TUF signing failed (retried within %g s): %s",
                self.settings.interval,
                _one_line(exc),
            )
            if generation is not None:
                self.seen = generation
            self.next_round = started + self.settings.interval
            return
        if not done.held:
            return  # another worker is signing: try again at the next watch
        self.seen = done.generation
        self.next_round = started + self.settings.interval
        if done.signed:
            log.info("TUF: signed %s", ", ".join(done.signed))

    async def _generation(self) -> int | None:
        try:
            return await run_in_threadpool(self.store.generation)
        except Exception:  # the database is down: the round by the clock will say so
            return None
