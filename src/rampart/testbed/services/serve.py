"""`rampart serve`, the update server, as a subprocess on a loopback port.

    with RampartServe(webroot, tmp_path / "serve.log", tls=pki.server) as server:
        server.url                   # https://localhost:PORT
        server.stop()                # SIGTERM (graceful: the check buffer is flushed)

Ready once a GET of `ready_path` is answered 200 (default the login page, which
loads no cache; a version check needs `ready_headers` on servers that refuse an
anonymous one). The command is the `rampart` beside this Python (a virtual
environment's), else `python -m rampart`; with the caller's environment, so that
PYTHONPATH chooses the source tree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rampart.testbed.services.base import START_TIMEOUT, Service, free_port, http_status
from rampart.testbed.services.pki import Cert


def rampart_command() -> list[str]:
    """How to run this Python's `rampart`."""
    beside = Path(sys.executable).parent / "rampart"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "rampart"]


class RampartServe(Service):
    """`rampart serve --webroot WEBROOT --listen 127.0.0.1:PORT` (a free port unless
    `port` is given), with `--db`, `--tls-cert/--tls-key`, `--workers` when given and
    then `options`; its output appended to `log`; `name` in its errors."""

    def __init__(
        self,
        webroot: Path,
        log: Path,
        *,
        db: str | None = None,
        tls: Cert | None = None,
        workers: int | None = None,
        options: Sequence[str] = (),
        port: int | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/admin/login",
        ready_headers: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT,
        name: str = "rampart serve",
    ) -> None:
        self.webroot = webroot
        self.port = port or free_port()
        self.tls = tls
        argv: list[str | os.PathLike[str]] = [
            *(command or rampart_command()),
            "serve",
            "--webroot",
            webroot,
            "--listen",
            f"127.0.0.1:{self.port}",
        ]
        if db is not None:
            argv += ["--db", db]
        if tls is not None:
            argv += ["--tls-cert", tls.cert, "--tls-key", tls.key]
        if workers is not None:
            argv += ["--workers", str(workers)]
        argv += options

        def ready() -> bool:
            status = http_status(self.port, ready_path, headers=ready_headers, tls=tls is not None)
            return status == 200

        super().__init__(name, argv, log, ready=ready, timeout=timeout, env=env)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}"
