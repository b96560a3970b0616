"""Slow clients against `rampart serve`: legitimate version checks while thousands of
slowloris connections are held, with this tree's server and with a reference commit's.

    .venv/bin/python bench/server_slow_clients.py [--slow 2000] [--hold 60] [--addresses 4]
                                                  [--rate 20] [--reference 692479c]
                                                  [--schemes http,https] [--json]
                                                  [--silent-share 0.5]

Set-up, in a work directory under /var/tmp (removed at the end): a vendor key and
release 1.0.0 published with `rampart publish`; a throwaway CA and its certificate for
127.0.0.1 (rampart.testbed.services, with Python's `cryptography`); the reference
commit's `src/` extracted with `git archive` (run with this tree's virtual environment).
Each server runs with one worker on 127.0.0.1 and a fresh SQLite database, with its
default settings (this tree's: 64 connections per address, 10 s header and handshake
deadlines, 30 s body).

For each server (reference, this tree) and each scheme (http, https), `--slow`
connections are held from `--addresses` loopback addresses (127.0.0.2 and up) for
`--hold` seconds, slowloris style: each sends a request line and one header, then one
more header line every 2 s, never the blank line that ends the headers. Over https,
a share of them (`--silent-share`, default half) send nothing at all (a handshake
that never starts); the others complete the TLS handshake first. A connection the
server closes is opened again 0.5 s later, so the attacker keeps trying to hold all of
them for the whole hold.

Meanwhile a legitimate client on 127.0.0.1 (a thread, blocking sockets) sends
identified version checks at `--rate` per second, each on a new connection with a
10 s timeout, from 5 s after the attack starts until it ends. Reported per run:
checks sent, answered 200, the share answered 200 (goal: >= 99 %), their p50 and p99
latency, other outcomes (status codes, timeouts, resets), the mean number of slow
connections open, and the ratio of this tree's share to the reference's.

Exit code 0 whether or not the goal is met (a benchmark, not a test), 1 if the set-up
fails or a server does not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import build_release, positive_int, terminate_as_interrupt
from rampart.testbed import services

ROOT = Path(__file__).resolve().parent.parent
OS_NAME = "clipos"
GOAL = 0.99
RAMP = 5.0  # seconds of attack before the legitimate checks are counted
TRICKLE = 2.0  # seconds between two header lines of a slow connection
RECONNECT = 0.5  # seconds before a closed slow connection is opened again
CHECK_HEADERS = {"clipos-machineid": "0123456789abcdef0123456789abcdef", "clipos-version": "1.0.0"}
CHECK = (
    b"GET /update/v1/clipos/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    + b"".join(f"{k}: {v}\r\n".encode() for k, v in CHECK_HEADERS.items())
    + b"Connection: close\r\n\r\n"
)


class BenchError(Exception):
    """The set-up failed or a server misbehaved: exit code 1."""


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str | Path], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    if result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv[:3]))}...: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Result:
    code: str
    scheme: str
    slow: int
    sent: int = 0
    ok: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    slow_open_mean: float = 0.0
    slow_reconnects: int = 0

    @property
    def share(self) -> float:
        return self.ok / self.sent if self.sent else 0.0


# --- the attacker -----------------------------------------------------------------------


class Attack:
    def __init__(
        self, port: int, tls: bool, count: int, addresses: int, until: float, silent: float
    ) -> None:
        self.port = port
        self.silent = silent
        self.tls = tls
        self.count = count
        self.addresses = [f"127.0.0.{2 + i}" for i in range(addresses)]
        self.until = until
        self.open = 0
        self.reconnects = 0
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    async def one(self, n: int) -> None:
        source = self.addresses[n % len(self.addresses)]
        silent = self.tls and (n * self.silent) % 1 + self.silent >= 1  # spread evenly
        handshake = self.tls and not silent
        first = True
        while time.monotonic() < self.until:
            if not first:
                self.reconnects += 1
                await asyncio.sleep(RECONNECT)
            first = False
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1",
                        self.port,
                        local_addr=(source, 0),
                        ssl=self.context if handshake else None,
                        server_hostname="127.0.0.1" if handshake else None,
                    ),
                    timeout=30,
                )
                self.open += 1
                try:
                    if not silent:
                        writer.write(b"GET /update/v1/clipos/version HTTP/1.1\r\nHost: x\r\n")
                    while time.monotonic() < self.until:
                        with contextlib.suppress(TimeoutError):
                            if await asyncio.wait_for(reader.read(1), TRICKLE) == b"":
                                break  # closed by the server
                        if not silent:
                            writer.write(b"X-Slow: 1\r\n")
                            await writer.drain()
                finally:
                    self.open -= 1
            except (OSError, TimeoutError, ssl.SSLError):
                pass
            finally:
                if writer is not None:
                    writer.transport.abort()

    async def run(self, samples: list[int]) -> None:
        async def sample() -> None:
            while time.monotonic() < self.until:
                samples.append(self.open)
                await asyncio.sleep(1)

        tasks = [asyncio.create_task(self.one(n)) for n in range(self.count)]
        tasks.append(asyncio.create_task(sample()))
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the legitimate client --------------------------------------------------------------


def legitimate(port: int, tls: bool, rate: float, start: float, until: float) -> list[str]:
    """Version checks from 127.0.0.1 from `start` to `until`: one outcome per check
    ("200 <ms>", "503", "timeout", "reset", ...)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outcomes: list[str] = []
    while time.monotonic() < start:
        time.sleep(0.05)
    next_at = time.monotonic()
    while next_at < until:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += 1 / rate
        began = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
                sock.sendall(CHECK)
                data = b""
                while b"\r\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
            if status == "200":
                outcomes.append(f"200 {(time.monotonic() - began) * 1000:.1f}")
            else:
                outcomes.append(status)
        except TimeoutError:
            outcomes.append("timeout")
        except (ConnectionError, ssl.SSLError):
            outcomes.append("reset")
        except OSError as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


# --- one run ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rampart = str(Path(sys.executable).parent / "rampart")
        self.webroot = work / "webroot"

    def setup(self) -> None:
        key, pub = self.work / "vendor.key", self.work / "vendor.pub"
        _run([self.rampart, "keygen", "--unencrypted", "--secret-key", key, "--public-key", pub])
        # A real release (`rampart publish` refuses random bytes as a Core or a UKI).
        core, efiboot = build_release(self.rampart, self.work, OS_NAME, "1.0.0", 0)
        publish: list[str | Path] = [self.rampart, "publish", "--webroot", self.webroot]
        publish += ["--os", OS_NAME, "--version", "1.0.0", "--core", core, "--efiboot", efiboot]
        _run([*publish, "--secret-key", key])
        ca = services.make_ca(self.work, "ca", valid=services.validity(1))
        self.cert = services.make_cert(self.work, "server", ca, ["127.0.0.1"])
        reference = self.work / "reference"
        reference.mkdir()
        git = subprocess.Popen(
            ["git", "-C", str(ROOT), "archive", self.args.reference, "src"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        untar = subprocess.run(
            ["tar", "-x", "-C", str(reference)], stdin=git.stdout, capture_output=True, check=False
        )
        _, error = git.communicate()
        if git.returncode != 0 or untar.returncode != 0:
            raise BenchError(f"git archive {self.args.reference}: {error.decode().strip()}")
        self.reference_src = reference / "src"

    def serve(self, code: str, scheme: str, run: int) -> services.RampartServe:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.reference_src if code != "this tree" else ROOT / "src")
        return services.RampartServe(
            self.webroot,
            self.work / f"serve-{run}.log",
            db=f"sqlite:///{self.work}/run-{run}.sqlite",
            tls=self.cert if scheme == "https" else None,
            command=[sys.executable, "-m", "rampart"],
            env=env,
            ready_path="/update/v1/clipos/version",
            ready_headers=CHECK_HEADERS,
            timeout=60,
            name=f"{code} server",
        )

    def run(self, code: str, scheme: str, run: int) -> Result:
        args = self.args
        server = self.serve(code, scheme, run)
        port = server.port
        result = Result(code, scheme, args.slow)
        try:
            began = time.monotonic()
            until = began + RAMP + args.hold
            outcomes: list[str] = []
            thread = threading.Thread(
                target=lambda: outcomes.extend(
                    legitimate(port, scheme == "https", args.rate, began + RAMP, until)
                )
            )
            thread.start()
            samples: list[int] = []
            attack = Attack(
                port, scheme == "https", args.slow, args.addresses, until, args.silent_share
            )
            asyncio.run(attack.run(samples))
            thread.join()
        finally:
            server.close(timeout=60)
        latencies = sorted(float(o.split()[1]) for o in outcomes if o.startswith("200 "))
        result.sent = len(outcomes)
        result.ok = len(latencies)
        result.outcomes = dict(Counter(o.split()[0] for o in outcomes))
        if latencies:
            result.p50_ms = latencies[len(latencies) // 2]
            result.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        held = samples[int(RAMP) :] or samples
        result.slow_open_mean = sum(held) / len(held) if held else 0.0
        result.slow_reconnects = attack.reconnects
        return result


def print_table(results: list[Result], reference: str) -> None:
    print(
        f"{'server':<16} {'scheme':<6} {'slow':>5} {'checks':>6} {'200':>6} {'share':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'slow open':>9} {'reconn.':>7}  other outcomes"
    )
    for r in results:
        other = ", ".join(f"{k}: {v}" for k, v in sorted(r.outcomes.items()) if k != "200")
        print(
            f"{r.code:<16} {r.scheme:<6} {r.slow:>5} {r.sent:>6} {r.ok:>6} "
            f"{r.share * 100:>6.1f}% {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} "
            f"{r.slow_open_mean:>9.0f} {r.slow_reconnects:>7}  {other or '-'}"
        )
    for scheme in sorted({r.scheme for r in results}):
        pair = {r.code: r for r in results if r.scheme == scheme}
        new, old = pair.get("this tree"), pair.get(reference)
        if new is None:
            continue
        verdict = "met" if new.share >= GOAL else "NOT met"
        line = f"{scheme}: this tree answered {new.share * 100:.1f}% of checks 200 (goal >= 99%: "
        line += verdict + ")"
        if old is not None:
            ratio = new.share / old.share if old.share else float("inf")
            line += f"; {reference}: {old.share * 100:.1f}%; ratio {ratio:.2f}"
        print(line)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slow", type=positive_int, default=2000, help="slow connections held")
    p.add_argument("--hold", type=positive_int, default=60, help="seconds the attack lasts")
    p.add_argument("--addresses", type=positive_int, default=4, help="attacking addresses")
    p.add_argument(
        "--silent-share",
        type=float,
        default=0.5,
        help="over https, the share of slow connections that never start the handshake",
    )
    p.add_argument("--rate", type=float, default=20.0, help="legitimate checks per second")
    p.add_argument("--reference", default="692479c", help="the commit to compare with")
    p.add_argument("--schemes", default="http,https", help="http, https or both")
    p.add_argument("--no-reference", action="store_true", help="only this tree's server")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    if not set(schemes) <= {"http", "https"} or not 0 < args.rate <= 1000:
        print("bench: --schemes takes http,https; --rate 0 to 1000", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="rampart-bench-slow-", dir="/var/tmp"))
    results: list[Result] = []
    try:
        with terminate_as_interrupt():
            bench = Bench(args, work)
            bench.setup()
            codes = ["this tree"] if args.no_reference else [args.reference, "this tree"]
            run = 0
            for scheme in schemes:
                for code in codes:
                    run += 1
                    _log(f"{code}, {scheme}: {args.slow} slow connections for {args.hold} s")
                    results.append(bench.run(code, scheme, run))
    except (BenchError, services.ServiceError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        json.dump([asdict(r) | {"share": r.share} for r in results], sys.stdout, indent=2)
        print()
    else:
        print_table(results, args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
