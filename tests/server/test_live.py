"""The Rampart client against a live `rampart serve` over HTTPS (the real processes)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rampart.testbed.services import Pki, RampartServe, world_readable_tmp
from tests.conftest import KeyPair, make_keypair, run_cli
from tests.device.conftest import DeviceDirs, make_device, make_release, publish


@pytest.fixture
def vendor(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "vendor")


@pytest.fixture
def live(tmp_path: Path, vendor: KeyPair, pki: Pki) -> Iterator[tuple[str, Path]]:
    """`rampart serve` with TLS on loopback, webroot with 1.0.1 (default) and 1.0.2."""
    webroot = world_readable_tmp() / "webroot"
    try:
        alpha2 = make_release(tmp_path / "r2", "5.0.0-alpha.2")
        publish(webroot, vendor, alpha2)
        publish(webroot, vendor, make_release(tmp_path / "r3", "5.0.0-alpha.3"))
        publish(webroot, vendor, alpha2, force=True)  # the default channel back at alpha.2
        with RampartServe(webroot, tmp_path / "serve.log", tls=pki.server, timeout=20) as server:
            yield server.url, webroot
            server.stop()
    finally:
        shutil.rmtree(webroot.parent, ignore_errors=True)


def admin(webroot: Path, *argv: str) -> Any:
    result = run_cli(*argv[:2], *argv[2:], "--webroot", str(webroot), "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def device(tmp_path: Path, name: str, vendor: KeyPair, pki: Pki, url: str, mid: str) -> DeviceDirs:
    dev = make_device(tmp_path / name, vendor, pki.ca.cert, url, running="5.0.0-alpha.1")
    dev.machine_id.write_text(mid + "\n")
    return dev


def test_client_follows_its_channel_and_reports(
    tmp_path: Path, vendor: KeyPair, pki: Pki, live: tuple[str, Path]
) -> None:
    url, webroot = live
    stable_id, beta_id = "a" * 32, "b" * 32
    admin(webroot, "machine", "admission", "first-use")  # their keys: admitted when they call
    admin(webroot, "channel", "create", "beta", "--os", "clipos", "--version", "5.0.0-alpha.3")
    admin(webroot, "machine", "assign", beta_id, "--os", "clipos", "--channel", "beta")
    stable = device(tmp_path, "stable", vendor, pki, url, stable_id)
    beta = device(tmp_path, "beta", vendor, pki, url, beta_id)
    time.sleep(1.2)  # admin changes reach the server's caches within a second
    assert run_cli("update", *stable.argv()).code == 20
    assert run_cli("update", *beta.argv()).code == 20
    assert "core_5.0.0-alpha.2" in stable.lvs()
    assert "core_5.0.0-alpha.3" in beta.lvs()
    time.sleep(0.3)
    view = admin(webroot, "fleet")
    assert isinstance(view, dict)
    assert view["counts"] == {
        "checks": 2,
        "machines": 2,
        "reports_success": 2,
        "anonymous_checks": 0,
        "anonymous_machines": 0,
        "anonymous_reports": 0,
    }
    machines = {m["machine_id"]: m for m in admin(webroot, "machine", "list")}
    assert machines[beta_id]["channel"] == "beta"
    assert machines[stable_id]["version"] == "5.0.0-alpha.1"


def test_paused_rollout_stops_being_offered(
    tmp_path: Path, vendor: KeyPair, pki: Pki, live: tuple[str, Path]
) -> None:
    url, webroot = live
    admin(
        webroot,
        "channel",
        "rollout",
        "start",
        "stable",
        "--os",
        "clipos",
        "--version",
        "5.0.0-alpha.3",
        "--percent",
        "99.99",
    )
    admin(webroot, "channel", "rollout", "pause", "stable", "--os", "clipos")
    dev = device(tmp_path, "d", vendor, pki, url, "c" * 32)
    time.sleep(1.2)
    assert run_cli("update", *dev.argv()).code == 20
    assert "core_5.0.0-alpha.2" in dev.lvs()  # the channel's version, not the paused rollout


def test_a_device_signs_its_check_and_report_and_counts_once_admitted(
    tmp_path: Path, vendor: KeyPair, pki: Pki, live: tuple[str, Path]
) -> None:
    """The client signs with its key (a file: no TPM here); the server keeps an unknown
    key pending, and with admission on first use admits a machine's first key."""
    from rampart.device import identity

    url, webroot = live
    pending = device(tmp_path, "pending", vendor, pki, url, "d" * 32)
    assert run_cli("update", *pending.argv()).code == 20
    time.sleep(0.3)
    key = identity.load(pending.root / "identity", None)
    assert key is not None
    [row] = admin(webroot, "machine", "keys", "d" * 32)
    assert (row["key_id"], row["kind"], row["state"]) == (key.key_id, "file", "pending")
    admin(webroot, "machine", "admission", "first-use")
    first = device(tmp_path, "first", vendor, pki, url, "e" * 32)
    time.sleep(1.2)  # the setting reaches the server's caches within a second
    assert run_cli("update", *first.argv()).code == 20
    time.sleep(0.3)
    [row] = admin(webroot, "machine", "keys", "e" * 32)
    assert row["state"] == "admitted" and row["last_auth"] is not None
    seen = {m["machine_id"]: m for m in admin(webroot, "fleet")["last_seen"]}
    assert seen["e" * 32]["authenticated"] is True and seen["e" * 32]["key"] == "file"
    assert "d" * 32 not in seen  # pending: it does not count
    assert admin(webroot, "fleet")["counts"]["anonymous_machines"] == 1
