"""Install reports: the client tells the server how each attempt ended."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rampart.device import update
from rampart.errors import TransportError
from rampart.testbed.services import Pki, world_readable_tmp
from tests.conftest import KeyPair, make_keypair, run_cli
from tests.device.conftest import OS, make_device, make_release, publish
from tests.device.hostile import hostile_server


def test_reports_success_and_failure_with_identification_headers(
    tmp_path: Path, vendor: KeyPair, pki: Pki
) -> None:
    root = world_readable_tmp() / "webroot"
    try:
        publish(root, vendor, make_release(tmp_path / "rel", "5.0.0-alpha.3"))
        posts: list[tuple[str, dict[str, str], bytes]] = []
        with hostile_server(root, pki.server.cert, pki.server.key, {}, posts) as url:
            device = make_device(tmp_path / "device", vendor, pki.ca.cert, url)
            assert run_cli("update", *device.argv()).code == 20
            path, headers, body = posts[-1]
            assert path == f"/update/v1/{OS}/report"
            assert headers["clipos-machineid"] == "0123456789abcdef0123456789abcdef"
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body) == {
                "from": "5.0.0-alpha.1",
                "to": "5.0.0-alpha.3",
                "outcome": "success",
                "error": "",
            }
            # A failed attempt is reported too, with its error.
            other = make_keypair(tmp_path / "other", "other")
            failing = make_device(tmp_path / "device2", other, pki.ca.cert, url)
            result = run_cli("update", *failing.argv())
            assert result.code == 11
            _, _, body = posts[-1]
            report = json.loads(body)
            assert report["outcome"] == "failure"
            assert "signed by key" in report["error"]
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def test_report_failure_is_not_fatal(tmp_path: Path, vendor: KeyPair, pki: Pki) -> None:
    device = make_device(tmp_path / "device", vendor, pki.ca.cert, "https://localhost:1")
    dev = device.open()
    # No server at all: the report is logged and dropped, never raised.
    update.send_report(dev, update.make_fetcher(dev), None, "failure", "x")
    with pytest.raises(TransportError, match="connection refused"):
        update.update(dev, update.make_fetcher(dev))
