"""Machines that sign their checks and reports, for the server's tests: the device's own
code signs (rampart.device.identity, Ed25519 key files), and the keys are admitted in
the server's database, so that what they send counts."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient

from rampart.contracts import identity as contract
from rampart.contracts import wire
from rampart.contracts.version import parse_version
from rampart.device import identity
from rampart.server import audit
from rampart.server.store import Proof, Store

OS = "clipos"
BY = audit.Actor("cli", "tests", "admin", "local")


def identity_headers(mid: str, version: str = "1.0.0") -> dict[str, str]:
    return {"clipos-machineid": mid, "clipos-version": version}


@dataclass
class Device:
    """A machine that signs: its machine-id, key directory and key (file or TPM)."""

    mid: str
    directory: Path
    key: identity.DeviceKey
    version: str = "1.0.0"

    def signed(self, kind: str, body: bytes = b"", version: str | None = None) -> dict[str, str]:
        running = parse_version(self.version if version is None else version).core
        request = identity.Request(kind, OS, self.mid, running, 1, body)
        return identity.signed_headers(self.key, self.directory, request)

    def headers(self, kind: str, body: bytes = b"", version: str | None = None) -> dict[str, str]:
        running = self.version if version is None else version
        return {**identity_headers(self.mid, running), **self.signed(kind, body, running)}

    def check(self, client: TestClient, version: str | None = None) -> tuple[int, str]:
        """A signed version check: (status, body); keeps the nonce of a 200."""
        sent = self.headers("version", version=version)
        response = client.get(f"/update/v1/{OS}/version", headers=sent)
        if response.status_code == 200:
            identity.save_nonce(self.directory, wire.version_nonce(response.content))
        return response.status_code, response.text

    def report(
        self, client: TestClient, outcome: str = "success", to: str = "1.0.1"
    ) -> tuple[int, str]:
        body = json.dumps({"from": "1.0.0", "to": to, "outcome": outcome, "error": ""}).encode()
        sent = self.headers("report", body)
        response = client.post(f"/update/v1/{OS}/report", content=body, headers=sent)
        return response.status_code, response.text


def file_device(directory: Path, mid: str) -> Device:
    return Device(mid, directory, identity.ensure(directory, None))


@dataclass
class SignedFleet:
    """Machines with admitted keys, made on first use (a key directory each)."""

    store: Store
    root: Path
    devices: dict[str, Device] = field(default_factory=dict)

    def __call__(self, mid: str) -> Device:
        found = self.devices.get(mid)
        if found is None:
            found = file_device(self.root / mid, mid)
            enroll = (found.key.kind, contract.encode_key(found.key.spki))
            self.store.admit(mid, by=BY, enroll=enroll)
            self.devices[mid] = found
        return found


_COUNTER = itertools.count(1)


def proof(store: Store, mid: str) -> Proof:
    """A Proof for a Check or Report of `mid` written to the store directly: the machine
    gets an admitted key the first time (its counter starts at 0), and each proof a
    counter above every one before."""
    keys = store.machine_keys(mid, "admitted")
    if keys:
        key_id = str(keys[0]["key_id"])
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        spki = (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        key_id = store.admit(mid, by=BY, enroll=("file", contract.encode_key(spki)))
    return Proof(mid, key_id, next(_COUNTER), None, None, False)
