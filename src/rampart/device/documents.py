"""A release's signed documents beside its payloads (Core's chunk index and deltas,
the boot loader), fetched by the unprivileged fetch process and verified by root: in
minisign mode with the pinned key (the `.sig` beside each, its trusted comment the
release's version), in TUF mode against the targets the release keys signed."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from rampart.contracts import hashing, signing, wire
from rampart.contracts.version import Version
from rampart.device.fetch import Fetcher
from rampart.device.trust import ExpectedTarget
from rampart.errors import VerificationError

SIG_CAP = 1 << 16

# What verifies a release's document: in minisign mode the pinned key (its
# `.sig`, the version its trusted comment); in TUF mode the targets the release keys
# signed, by path below the dist URL (`<V>/<name>`: update.check_trust).
Trust = signing.PublicKey | Mapping[str, ExpectedTarget]


def signed_document(
    fetcher: Fetcher, trust: Trust, dist_url: str, version: Version, name: str, cap: int
) -> bytes | None:
    """The document `name` of release `version` (at most `cap` bytes), verified as
    `trust` says and signed for `version` (VerificationError otherwise); None if the
    server has none, or in TUF mode if the release keys signed none."""
    url = f"{dist_url}/{version.core}/{name}"
    if not isinstance(trust, signing.PublicKey):
        return _target_document(fetcher, trust.get(f"{version.core}/{name}"), url, name, cap)
    (sig_status, raw), (status, data) = fetcher.documents(
        [(url + wire.SIGNATURE_SUFFIX, SIG_CAP), (url, cap)]
    )
    if sig_status != 200 or status != 200:
        return None
    signature = signing.parse_signature(raw, f"{name}.sig")
    signing.verify_data(trust, signature, data, name)
    comment = signature.trusted_text(f"{name}.sig")
    if comment != version.core:
        raise VerificationError(
            f"{name}: signed for version {comment[:80]!r}, expected {version.core!r}"
        )
    return data


def _target_document(
    fetcher: Fetcher, target: ExpectedTarget | None, url: str, name: str, cap: int
) -> bytes | None:
    """TUF mode: the document at `url`, which must be `target` (its length and
    BLAKE2b-512, as the release keys signed them: the version and kind were checked
    with the target's fields)."""
    if target is None:
        return None
    if target.length > cap:
        raise VerificationError(f"{name}: signed with {target.length} bytes, over {cap}")
    ((status, data),) = fetcher.documents([(url, target.length)])
    if status != 200:
        return None
    if len(data) != target.length or not hmac.compare_digest(
        hashing.blake2b(data).digest(), target.digest
    ):
        raise VerificationError(
            f"{name}: not the file the release keys signed ({target.path}: another "
            "length or BLAKE2b-512)"
        )
    return data
