"""Authenticated devices (docs/server.md "Device identity"): who signed a check or a
report, whether the server admitted that key, and what its TPM attested.

A request from a Rampart device carries its key and a signature (contracts/identity.py).
Here, on the hot path:

* no signature: an anonymous request (the CLIP OS updater, an older client);
* a valid signature by a key the server does not know: the key is recorded as pending
  (or admitted at once, if the operator turned on admission on first use), and the
  request is answered as an anonymous one;
* a valid signature by a pending, rejected or replaced key: anonymous;
* a valid signature by the machine's admitted key, with a counter above the last one
  accepted: authenticated (`Proof`). A TPM key's signature is a quote of PCR 7; it is
  attested if its nonce is one this server handed out within NONCE_LIFETIME;
* a malformed or invalid signature, or a counter at or below the last one (a replay):
  refused, 401.

The counter is checked in each worker's memory first, and again where it counts, in the
transaction that records the check or report (`UPDATE ... WHERE counter < :c`): a
replay sent to another worker or instance is refused when it is recorded.

The nonce a signed request gets back (`rampart_nonce` in the version answer) is
stateless: the time and an HMAC of it and the machine-id under a key kept in the
database (`settings`), so every instance hands out and accepts the same.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from rampart.contracts import identity as contract
from rampart.errors import FormatError, VerificationError
from rampart.server.store import ADMITTED, KeyState, Proof, Store

NONCE_LIFETIME = 2 * 86400.0  # seconds a nonce proves a quote fresh
MAX_CACHED = 200_000  # machines whose keys a worker keeps in memory


class Denied(Exception):
    """A signed request that does not hold: answer 401 with this reason."""


def make_nonce(secret: bytes, machine_id: str, now: float) -> str:
    stamp = str(int(now))
    mac = hmac.new(secret, f"{stamp}.{machine_id}".encode(), hashlib.sha256).hexdigest()
    return f"{stamp}.{mac[:32]}"


def nonce_fresh(secret: bytes, machine_id: str, nonce: str, now: float) -> bool:
    """Whether `nonce` is one this server handed `machine_id` within NONCE_LIFETIME."""
    stamp, _, _ = nonce.partition(".")
    if not stamp.isdigit() or len(stamp) > 12:
        return False
    if not 0 <= now - int(stamp) <= NONCE_LIFETIME:
        return False
    return hmac.compare_digest(make_nonce(secret, machine_id, int(stamp)), nonce)


@dataclass(frozen=True)
class Signed:
    """What `Devices.authenticate` found: the proof (None: answer as anonymous) and
    whether the request was validly signed (it gets a nonce back)."""

    proof: Proof | None
    signed: bool


ANONYMOUS = Signed(None, False)


class Devices:
    """The keys of the machines (cached per worker, dropped when the database's
    generation changes), the counters accepted, the nonce key and admission mode."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.generation = -1
        self.keys: OrderedDict[str, dict[str, KeyState]] = OrderedDict()
        self.secret = b""
        self.first_use = False
        self.known: dict[str, frozenset[str]] = {}  # known-good PCR 7 values per OS

    async def sync(self, generation: int) -> None:
        """Drop the cached keys after an administrative change (Fleet.refresh calls it)."""
        if generation == self.generation and self.secret:
            return
        if not self.secret:
            self.secret = await run_in_threadpool(self.store.nonce_secret)
        self.first_use = await run_in_threadpool(self.store.first_use_admission)
        self.known = await run_in_threadpool(self.store.known_pcr7_sets)
        self.keys.clear()
        self.generation = generation

    async def _keys_of(self, machine_id: str) -> dict[str, KeyState]:
        found = self.keys.get(machine_id)
        if found is None:
            found = await run_in_threadpool(self.store.machine_key_states, machine_id)
            self.keys[machine_id] = found
            if len(self.keys) > MAX_CACHED:
                self.keys.popitem(last=False)
        else:
            self.keys.move_to_end(machine_id)
        return found

    def attested_good(self, os_name: str, proof: Proof | None) -> bool:
        """Whether `proof` is a fresh quote of a PCR 7 known good for `os_name`."""
        return (
            proof is not None
            and proof.attested
            and proof.pcr7 in self.known.get(os_name, frozenset())
        )

    def nonce(self, machine_id: str, now: float | None = None) -> str | None:
        """A nonce for `machine_id`'s next quote; None before the nonce key is loaded (a
        nonce made under an empty key could be made by anyone)."""
        if not self.secret:
            return None
        return make_nonce(self.secret, machine_id, time.time() if now is None else now)

    async def authenticate(
        self,
        headers: Mapping[str, str],
        kind: str,
        os_name: str,
        machine_id: str | None,
        version: str | None,
        body: bytes = b"",
    ) -> Signed:
        """Who signed this request (see the module's docstring); Denied to refuse it."""
        key_text, auth_text = headers.get(contract.KEY_HEADER), headers.get(contract.AUTH_HEADER)
        if key_text is None and auth_text is None:
            return ANONYMOUS
        if key_text is None or auth_text is None or machine_id is None or version is None:
            raise Denied(
                f"{contract.KEY_HEADER} and {contract.AUTH_HEADER} go together, with the "
                "identification headers"
            )
        try:
            spki = contract.decode_key(key_text)
            auth = contract.parse_auth(auth_text)
            base = contract.signature_base(
                kind, os_name, machine_id, version, auth.counter, auth.nonce, auth.epoch,
                auth.pcr7, body,
            )  # fmt: skip
            verified = contract.verify(spki, auth, base)
        except (FormatError, VerificationError) as exc:
            raise Denied(str(exc)) from None
        states = await self._keys_of(machine_id)
        state = states.get(verified.key_id)
        if state is None:
            admitted = await run_in_threadpool(
                self.store.present_key,
                machine_id,
                verified.key_id,
                verified.kind,
                key_text,
                self.first_use,
            )
            self.keys.pop(machine_id, None)
            if not admitted:
                return Signed(None, True)
            state = KeyState(ADMITTED, 0)
        if state.state != ADMITTED:
            return Signed(None, True)
        if auth.counter <= state.counter:
            raise Denied(
                f"replayed request: counter {auth.counter} is not above {state.counter}, "
                "the last one accepted from this machine"
            )
        states[verified.key_id] = KeyState(ADMITTED, auth.counter)
        attested = (
            verified.pcr7 is not None
            and bool(self.secret)
            and nonce_fresh(self.secret, machine_id, auth.nonce, time.time())
        )
        proof = Proof(
            machine_id,
            verified.key_id,
            auth.counter,
            None if verified.pcr7 is None else verified.pcr7.hex(),
            auth.epoch,
            attested,
        )
        return Signed(proof, True)
