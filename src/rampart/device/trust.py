"""The device's TUF trust (docs/client.md "Trust modes"): which mode a device is in,
where its root comes from, what a payload must be, and which version the signed
channel head offers this machine. The client itself (python-tuf's ngclient, through
the unprivileged fetcher) is `device/tufclient.py`, imported only in TUF mode: a
minisign device never loads python-tuf.

In TUF mode a device trusts a root, not a key. The first root comes from, in order:
the local metadata directory (the newest root this device has verified; roots rotate
through it), the remote configuration's `root.json` (written by `rampart install`),
the system configuration's `root.json` (in Core: how a minisign-signed release
delivers the root to a device in the field). With none of them, the mode "auto"
falls back to minisign; "tuf" is an error.

ngclient keeps the metadata it verified in the metadata directory (on the state
partition, root's only): it is what makes a version going backwards, a snapshot of
another state (mix-and-match) or expired metadata (a freeze) detectable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rampart.contracts import tuf
from rampart.contracts.version import Version, parse_version
from rampart.device.config import TrustMode
from rampart.errors import FormatError, LocalError, OfferError, UsageError

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"  # a pinned root, in the remote or the system configuration
ROOT_CAP = 512 << 10  # ngclient's own cap for a root


@dataclass(frozen=True)
class TufSettings:
    """Where a device in TUF mode finds its trust and its repository."""

    metadata_dir: Path  # ngclient's verified metadata (state partition)
    bootstrap: Path | None  # the pinned root to start from; None: the metadata dir's
    metadata_url: str  # <webroot>/tuf
    targets_url: str  # <webroot>: target paths are relative to it
    channel: str


def settings(
    mode: TrustMode,
    metadata_dir: Path,
    pinned: Sequence[Path],
    metadata_url: str,
    channel: str,
) -> TufSettings | None:
    """The TUF settings of a device in `mode`, or None for minisign. `pinned`: where a
    pinned root may be, in order of preference; `metadata_url` "": none configured."""
    if mode == TrustMode.MINISIGN:
        return None
    if not metadata_url:
        if mode == TrustMode.TUF:
            raise FormatError("trust mode is tuf, but remote.toml has no tuf_url")
        return None
    targets_url = metadata_url.rsplit("/", 1)[0]
    if (metadata_dir / ROOT_FILE).exists():
        return TufSettings(metadata_dir, None, metadata_url, targets_url, channel)
    for path in pinned:
        if path.is_file():
            return TufSettings(metadata_dir, path, metadata_url, targets_url, channel)
    if mode == TrustMode.TUF:
        raise LocalError(
            f"trust mode is tuf, but there is no root to start from: neither "
            f"{metadata_dir / ROOT_FILE} nor {' nor '.join(str(p) for p in pinned)}"
        )
    return None


@dataclass(frozen=True)
class ExpectedTarget:
    """What a payload must be, as the release keys signed it."""

    path: str
    length: int
    digest: bytes  # BLAKE2b-512 (tuf.DEVICE_HASH)
    fields: tuf.PayloadFields


def choose(head: tuf.ChannelHead | None, offered: Version, machine_id: str, where: str) -> Version:
    """The version to install: what the signed channel head offers this machine (its
    own bucket, computed here), or the server's offer when no head is signed.
    OfferError if the server offers a version the head does not allow; a server that
    offers an allowed version other than this machine's is overruled, with a warning."""
    if head is None:
        return offered
    allowed = head.allowed()
    if offered.core not in allowed:
        raise OfferError(
            f"{where}: the server offers {offered.core}, which channel {head.channel}'s signed "
            f"head does not allow (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    own = head.offer(machine_id)
    if own is None:
        raise OfferError(f"{where}: channel {head.channel}'s signed head names no version")
    try:
        chosen = parse_version(own, f"channel {head.channel}")
    except UsageError as exc:
        raise FormatError(str(exc)) from None
    if chosen != offered:
        log.warning(
            "the server offers %s, but channel %s's signed head offers this machine %s: "
            "following the signed head",
            offered,
            head.channel,
            chosen,
        )
    return chosen
