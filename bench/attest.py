"""What verifying a signed check-in costs the server: Rampart's check of a TPM quote of
PCR 7 (rampart.contracts.identity.verify: parse the TPMS_ATTEST, ECDSA P-256 over it,
qualifying data, PCR selection and digest) and of an Ed25519 signature, against
tpm2-tools' own verifier, `tpm2_checkquote`, on the same quotes.

    .venv/bin/python bench/attest.py [--quotes 20] [--rounds 2000] [--json]

A private swtpm (rampart.testbed.services) makes --quotes quotes with the device's own
code (rampart.device.identity: the identity key, `tpm2_quote`), each over another
signature base. Rampart verifies each of them --rounds times in this process (the
figure: microseconds per verification, the median of five passes); `tpm2_checkquote`
verifies each once, as a process (the figure: milliseconds per quote, its wall time,
as a server that called it would pay). Printed: both, their ratio, and the Ed25519
verification of a file key's request for comparison. The exit code is 0 unless the
set-up fails (1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import positive_int
from rampart.contracts import identity as contract
from rampart.device import identity
from rampart.testbed import services

MID = "0123456789abcdef0123456789abcdef"


def _base(counter: int, pcr7: bytes | None) -> bytes:
    return contract.signature_base("version", "clipos", MID, "1.0.0", counter, "-", 1, pcr7, b"")


def _per_verify_us(spki: bytes, signed: list[tuple[contract.Auth, bytes]], rounds: int) -> float:
    """Microseconds per verification: the median of five passes over `rounds` of them."""
    passes = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(rounds):
            auth, base = signed[i % len(signed)]
            contract.verify(spki, auth, base)
        passes.append((time.perf_counter() - started) / rounds * 1e6)
    return statistics.median(passes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quotes", type=positive_int, default=20)
    parser.add_argument("--rounds", type=positive_int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rampart-attest-bench-") as tmp:
        work = Path(tmp)
        try:
            swtpm = services.Swtpm(work / "tpm")
        except services.ServiceError as exc:
            print(f"bench: error: swtpm: {exc}", file=sys.stderr)
            return 1
        with swtpm:
            chip = swtpm.tpm
            key = identity.ensure(work / "id", chip)
            pcr7 = chip.pcr_values((7,))[7]
            quotes: list[tuple[contract.Auth, bytes]] = []
            made = time.perf_counter()
            for counter in range(1, args.quotes + 1):
                base = _base(counter, pcr7)
                quote, signature, _ = chip.quote(hashlib.sha256(base).digest())
                quotes.append((contract.Auth(counter, "-", 1, pcr7, quote, signature), base))
            quote_ms = (time.perf_counter() - made) / args.quotes * 1000
            ours_us = _per_verify_us(key.spki, quotes, args.rounds)
            (work / "key.pem").write_text(key.pem())
            tool_ms = []
            for n, (auth, base) in enumerate(quotes):
                assert auth.quote is not None
                (work / f"q{n}").write_bytes(auth.quote)
                (work / f"s{n}").write_bytes(auth.signature)
                argv_tool = [
                    "tpm2_checkquote", "-u", str(work / "key.pem"), "-m", str(work / f"q{n}"),
                    "-s", str(work / f"s{n}"), "-F", "plain", "-g", "sha256",
                    "-q", hashlib.sha256(base).hexdigest(),
                ]  # fmt: skip
                started = time.perf_counter()
                done = subprocess.run(argv_tool, capture_output=True, check=False)
                tool_ms.append((time.perf_counter() - started) * 1000)
                if done.returncode != 0:
                    print(f"bench: error: tpm2_checkquote: {done.stderr.decode()}", file=sys.stderr)
                    return 1
        file_key = identity.ensure(work / "file", None)
        signed = []
        for counter in range(1, 101):
            base = _base(counter, None)
            assert file_key.private is not None
            auth = contract.Auth(counter, "-", 1, None, None, file_key.private.sign(base))
            signed.append((auth, base))
        ed25519_us = _per_verify_us(file_key.spki, signed, args.rounds)
    tool = statistics.median(tool_ms)
    result = {
        "quotes": args.quotes,
        "rounds": args.rounds,
        "tpm2_quote_ms": round(quote_ms, 2),
        "rampart_verify_quote_us": round(ours_us, 1),
        "tpm2_checkquote_ms": round(tool, 2),
        "ratio_tpm2_checkquote_to_rampart": round(tool * 1000 / ours_us, 1),
        "rampart_verify_ed25519_us": round(ed25519_us, 1),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"quote made by swtpm (tpm2_quote, the device's side): {quote_ms:.1f} ms")
        print(f"rampart verifies a TPM quote of PCR 7: {ours_us:.1f} us per check-in")
        print(
            f"tpm2_checkquote verifies the same quote: {tool:.1f} ms per quote (a process), "
            f"{result['ratio_tpm2_checkquote_to_rampart']}x Rampart's"
        )
        print(f"rampart verifies an Ed25519 (file key) request: {ed25519_us:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
