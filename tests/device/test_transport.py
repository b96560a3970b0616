"""HTTPS transport against a real nginx: pinning, host names, protocol versions, redirects."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rampart.device.transport import Limits, Transport, tls_context
from rampart.errors import TransportError
from rampart.testbed.services import Nginx, Pki, world_readable_tmp
from tests.device.conftest import start_nginx

LIMITS = Limits(connect_timeout=5, read_timeout=5, min_speed=1, stall_window=5)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    root = world_readable_tmp() / "site"
    (root / "update/v1/clipos").mkdir(parents=True)
    (root / "update/v1/clipos/version").write_text('version = "1.0.0"\n')
    yield root
    shutil.rmtree(root.parent, ignore_errors=True)


def serve(tmp_path: Path, site: Path, cert: object, **kw: str) -> Nginx:
    return start_nginx(tmp_path / "nginx", site, cert, **kw)  # type: ignore[arg-type]


def transport(ca: Path) -> Transport:
    return Transport(ca, {"clipos-machineid": "m", "clipos-version": "1.0.0"}, LIMITS)


def test_pinned_ca_accepts_its_server(tmp_path: Path, site: Path, pki: Pki) -> None:
    server = serve(tmp_path, site, pki.server)
    try:
        body = transport(pki.ca.cert).get_small(f"{server.url}/update/v1/clipos/version", 4096)
        assert body == b'version = "1.0.0"\n'
    finally:
        server.stop()


def test_server_certificate_from_another_ca_is_refused(
    tmp_path: Path, site: Path, pki: Pki
) -> None:
    server = serve(tmp_path, site, pki.other_server)
    try:
        with pytest.raises(TransportError, match="certificate refused"):
            transport(pki.ca.cert).get_small(f"{server.url}/update/v1/clipos/version", 4096)
    finally:
        server.stop()


def test_wrong_host_name_is_refused(tmp_path: Path, site: Path, pki: Pki) -> None:
    server = serve(tmp_path, site, pki.wrong_host)
    try:
        with pytest.raises(TransportError, match=r"certificate refused.*[Hh]ostname"):
            transport(pki.ca.cert).get_small(f"{server.url}/update/v1/clipos/version", 4096)
    finally:
        server.stop()


def test_system_ca_store_is_never_loaded(pki: Pki) -> None:
    context = tls_context(pki.ca.cert)
    stats = context.cert_store_stats()
    assert stats["x509_ca"] == 1
    assert context.minimum_version.name == "TLSv1_2"


def test_tls_1_1_only_server_is_refused(tmp_path: Path, site: Path, pki: Pki) -> None:
    server = serve(tmp_path, site, pki.server, protocols="TLSv1.1", ciphers="DEFAULT@SECLEVEL=0")
    try:
        # Control: the server really speaks TLS 1.1 to a client that allows it.
        probe = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{server.port}",
                "-tls1_1",
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-CAfile",
                str(pki.ca.cert),
            ],
            input=b"",
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert b"Protocol  : TLSv1.1" in probe.stdout or b"TLSv1.1" in probe.stdout, probe.stdout
        with pytest.raises(TransportError, match="TLS handshake failed"):
            transport(pki.ca.cert).get_small(f"{server.url}/update/v1/clipos/version", 4096)
    finally:
        server.stop()


def test_redirect_to_plain_http_is_refused(tmp_path: Path, site: Path, pki: Pki) -> None:
    server = serve(tmp_path, site, pki.server)
    try:
        with pytest.raises(TransportError, match="refusing a redirect to 'http://"):
            transport(pki.ca.cert).get_small(f"{server.url}/to-http/update/v1/clipos/version", 4096)
    finally:
        server.stop()


def test_redirect_to_https_is_followed(tmp_path: Path, site: Path, pki: Pki) -> None:
    server = serve(tmp_path, site, pki.server)
    try:
        body = transport(pki.ca.cert).get_small(
            f"{server.url}/to-https/update/v1/clipos/version", 4096
        )
        assert body.startswith(b"version")
    finally:
        server.stop()


def test_plain_http_url_is_refused(pki: Pki) -> None:
    with pytest.raises(TransportError, match="non-HTTPS"):
        transport(pki.ca.cert).get_small("http://127.0.0.1:1/version", 4096)


def test_http_error_status_is_a_transport_error(tmp_path: Path, site: Path, pki: Pki) -> None:
    server = serve(tmp_path, site, pki.server)
    try:
        with pytest.raises(TransportError, match="HTTP 404"):
            transport(pki.ca.cert).get_small(f"{server.url}/missing", 4096)
    finally:
        server.stop()


def test_connection_refused(pki: Pki) -> None:
    from rampart.testbed.services import free_port

    with pytest.raises(TransportError, match="connection refused"):
        transport(pki.ca.cert).get_small(f"https://localhost:{free_port()}/v", 4096)


class _Kept:
    def begin(self, offset: int, length: int, total: int) -> None:
        self.data = bytearray(length)
        self.held = 0

    def buffer(self) -> memoryview:
        return memoryview(self.data)[self.held :]

    def filled(self, count: int) -> None:
        self.held += count


def test_requests_in_a_row_share_one_kept_alive_connection(
    tmp_path: Path, site: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges and documents read whole leave their connection open for the next request
    to the same server: one TLS handshake for a run of chunks. (A body read with read1
    up to its length left the response open, and every request connected afresh.)"""
    (site / "a").write_bytes(bytes(range(256)) * 400)
    server = serve(tmp_path, site, pki.server)
    try:
        client = transport(pki.ca.cert)
        fresh: list[bool] = []
        send = client._send

        def counting(conn: Any, reused: bool, *rest: Any) -> Any:
            fresh.append(not reused)
            return send(conn, reused, *rest)

        monkeypatch.setattr(client, "_send", counting)
        for start in (0, 1000, 50_000):
            kept = _Kept()
            assert client.stream(f"{server.url}/a", start, None, 1 << 20, kept) == 102_400 - start
            assert kept.data == (bytes(range(256)) * 400)[start:]
        assert client.get_small(f"{server.url}/update/v1/clipos/version", 4096).startswith(b"ver")
        assert fresh == [True, False, False, False]
        client.close()
    finally:
        server.stop()
