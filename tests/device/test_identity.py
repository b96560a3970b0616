"""The device's identity (rampart.device.identity): a TPM identity key whose signatures
are quotes of PCR 7 (against a real swtpm, checked by the contract and by tpm2-tools'
own tpm2_checkquote), or an Ed25519 key in a 0600 file; the request counter."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from rampart import run
from rampart.contracts import identity as contract
from rampart.device import identity, tpm
from rampart.errors import LocalError, VerificationError

MID = "0123456789abcdef0123456789abcdef"


def _request(body: bytes = b"") -> identity.Request:
    return identity.Request("report" if body else "version", "clipos", MID, "1.0.0", 3, body)


def _verify(headers: dict[str, str], request: identity.Request) -> contract.Verified:
    """What the server does with the two headers (rampart.server re-reads them)."""
    spki = contract.decode_key(headers[contract.KEY_HEADER])
    auth = contract.parse_auth(headers[contract.AUTH_HEADER])
    base = contract.signature_base(
        request.kind, request.os_name, request.machine_id, request.version, auth.counter,
        auth.nonce, auth.epoch, auth.pcr7, request.body,
    )  # fmt: skip
    return contract.verify(spki, auth, base)


def test_a_tpm_identity_is_made_once_and_signs_with_quotes_of_pcr7(
    chip: tpm.Tpm, tmp_path: Path
) -> None:
    assert identity.load(tmp_path, chip) is None
    key = identity.ensure(tmp_path, chip)
    assert key.kind == contract.TPM_KEY
    assert identity.ensure(tmp_path, chip).spki == key.spki  # made once
    assert not (tmp_path / identity.KEY_FILE).exists()  # nothing of it on disk
    identity.save_nonce(tmp_path, "1733450000.abcdef")
    request = _request(b'{"outcome":"success"}')
    headers = identity.signed_headers(key, tmp_path, request)
    verified = _verify(headers, request)
    pcr7 = chip.pcr_values((7,))[7]
    assert verified == contract.Verified(contract.TPM_KEY, key.key_id, pcr7)
    auth = contract.parse_auth(headers[contract.AUTH_HEADER])
    assert auth.nonce == "1733450000.abcdef" and auth.epoch == 3
    # The reference verifier agrees: tpm2_checkquote with the key, quote, signature,
    # the PCR 7 value and the qualifying data.
    assert auth.quote is not None
    (tmp_path / "key.pem").write_text(key.pem())
    (tmp_path / "quote").write_bytes(auth.quote)
    (tmp_path / "sig").write_bytes(auth.signature)
    base = contract.signature_base(
        "report", "clipos", MID, "1.0.0", auth.counter, auth.nonce, 3, pcr7, request.body
    )
    result = run.run(
        ["tpm2_checkquote", "-u", str(tmp_path / "key.pem"), "-m", str(tmp_path / "quote"),
         "-s", str(tmp_path / "sig"), "-F", "plain", "-g", "sha256",
         "-q", hashlib.sha256(base).hexdigest()],
        check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Another request (here: another body) does not verify with this signature.
    with pytest.raises(VerificationError, match="made for another request"):
        _verify(headers, _request(b'{"outcome":"failure"}'))


def test_the_quote_reports_pcr7_as_it_is_at_signing(chip: tpm.Tpm, tmp_path: Path) -> None:
    key = identity.ensure(tmp_path, chip)
    before = _verify(identity.signed_headers(key, tmp_path, _request()), _request())
    chip._tool("tpm2_pcrextend", "7:sha256=" + "ab" * 32)
    after = _verify(identity.signed_headers(key, tmp_path, _request()), _request())
    assert before.pcr7 is not None
    assert after.pcr7 == hashlib.sha256(before.pcr7 + bytes.fromhex("ab" * 32)).digest()


def test_without_a_tpm_the_key_is_an_ed25519_file_of_mode_0600(tmp_path: Path) -> None:
    key = identity.ensure(tmp_path / "id", None)
    assert key.kind == contract.FILE_KEY
    mode = (tmp_path / "id" / identity.KEY_FILE).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE((tmp_path / "id").stat().st_mode) == 0o700
    assert identity.ensure(tmp_path / "id", None).spki == key.spki
    headers = identity.signed_headers(key, tmp_path / "id", _request())
    assert _verify(headers, _request()) == contract.Verified(contract.FILE_KEY, key.key_id, None)
    (tmp_path / "id" / identity.KEY_FILE).write_text("not a key")
    with pytest.raises(LocalError, match="not a PEM private key; remove it"):
        identity.load(tmp_path / "id", None)


def test_the_counter_always_grows_even_after_the_state_is_lost(tmp_path: Path) -> None:
    first = identity.next_counter(tmp_path, now=1000.0)
    assert first == 1_000_000
    assert identity.next_counter(tmp_path, now=1000.0) == first + 1  # same millisecond
    assert identity.next_counter(tmp_path, now=999.0) == first + 2  # clock went back
    (tmp_path / identity.COUNTER_FILE).unlink()
    assert identity.next_counter(tmp_path, now=2000.0) == 2_000_000  # state reset: the clock
    assert stat.S_IMODE((tmp_path / identity.COUNTER_FILE).stat().st_mode) == 0o600


def test_a_bad_nonce_from_the_server_is_not_kept(tmp_path: Path) -> None:
    identity.save_nonce(tmp_path, "BAD NONCE\n")
    assert identity.read_nonce(tmp_path) == contract.NO_NONCE
    identity.save_nonce(tmp_path, "17.ab")
    assert identity.read_nonce(tmp_path) == "17.ab"
