"""Debian's nginx, one master and one worker, with everything (configuration, pid file,
logs, temporary files) in its own state directory.

    nginx = Nginx.static(state, root, pki.server)   # serve `root` over HTTPS
    nginx.url                                       # https://localhost:PORT
    nginx.logged("GET /update/v1/...")              # seen in the access log
    nginx.stop()                                    # SIGTERM; stop(signal.SIGQUIT): graceful

`Nginx(state, http, port)` runs any `http { }` block (server blocks, upstreams: the
caller's); `static` writes a server block for one directory. The worker runs as root
when this process is root (pytest's temporary directories are 0700).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rampart import run
from rampart.testbed.services.base import (
    START_TIMEOUT,
    Service,
    ServiceError,
    free_port,
    port_open,
)
from rampart.testbed.services.pki import Cert

MAIN_CONF = """\
{user}
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
{http}
}}
"""

STATIC_SITE = """\
    access_log {state}/access.log{access_log};
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port}{ssl};
        server_name localhost;
{tls}        root {root};
{locations}    }}
"""

STATIC_TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        ssl_ciphers {ciphers};
"""


def find_nginx() -> str:
    """The nginx binary; ServiceError if it is not installed."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if found is None:
        raise ServiceError("nginx is not installed: run `make setup`")
    return found


class Nginx(Service):
    """nginx running `http` (the inside of the `http { }` block) in `state`, listening on
    `port` (which `http` names); ready once the port accepts connections.

    `root` is the directory it serves and `tls` whether it speaks HTTPS (for `url`);
    with `check`, `nginx -t` must accept the configuration before the start.
    """

    def __init__(
        self,
        state: Path,
        http: str,
        port: int,
        *,
        root: Path,
        tls: bool = True,
        connections: int = 64,
        check: bool = False,
        timeout: float = START_TIMEOUT,
    ) -> None:
        self.state = state
        self.port = port
        self.root = root
        self.tls = tls
        binary = find_nginx()
        state.mkdir(parents=True, exist_ok=True)
        self.conf = state / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf.write_text(
            MAIN_CONF.format(user=user, state=state, connections=connections, http=http)
        )
        argv = [binary, "-c", str(self.conf), "-p", f"{state}/", "-e", str(state / "error.log")]
        if check:
            test = run.run([*argv, "-t"], timeout=timeout, check=False)
            if test.returncode != 0:
                errors = test.stderr.decode(errors="replace")
                raise ServiceError(f"nginx -t:\n{errors}\n{self.conf.read_text()}")
        super().__init__(
            "nginx",
            [*argv, "-g", "daemon off;"],
            state / "stderr.log",
            ready=lambda: port_open(port),
            timeout=timeout,
            logs=[state / "error.log"],
        )

    @classmethod
    def static(
        cls,
        state: Path,
        root: Path,
        cert: Cert | None = None,
        *,
        protocols: str = "TLSv1.2 TLSv1.3",
        ciphers: str = "HIGH:!aNULL",
        locations: str = "",
        access_log: str = "",
        connections: int = 64,
        timeout: float = START_TIMEOUT,
    ) -> Nginx:
        """nginx serving the directory `root` on a free loopback port: over HTTPS with
        `cert` (and the TLS `protocols` and `ciphers`), else plain HTTP. `locations` are
        more blocks of the server, where `{port}` is its port; `access_log` is what
        follows the log's path (a format, `buffer=...`)."""
        port = free_port()
        tls = (
            ""
            if cert is None
            else STATIC_TLS.format(
                cert=cert.cert, key=cert.key, protocols=protocols, ciphers=ciphers
            )
        )
        site = STATIC_SITE.format(
            state=state,
            access_log=f" {access_log}" if access_log else "",
            port=port,
            ssl="" if cert is None else " ssl",
            tls=tls,
            root=root,
            locations=locations.replace("{port}", str(port)),
        )
        return cls(
            state,
            site,
            port,
            root=root,
            tls=cert is not None,
            connections=connections,
            timeout=timeout,
        )

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}"

    def access_log(self) -> str:
        return (self.state / "access.log").read_text()

    def logged(self, text: str, timeout: float = 30.0) -> bool:
        """Whether the access log shows `text` within `timeout` seconds: nginx writes a
        request's line after sending the response, so the client may be done first."""
        deadline = time.monotonic() + timeout
        while text not in self.access_log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
