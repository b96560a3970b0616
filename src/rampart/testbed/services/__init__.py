"""The real services the tests and the benchmarks run on this host: nginx, PostgreSQL,
swtpm, `rampart serve`, and the test PKI their TLS uses. One harness for both:

    from rampart.testbed import services

    pki = services.make_pki(tmp / "pki")
    with services.Nginx.static(tmp / "nginx", webroot, pki.server) as nginx: ...
    with services.RampartServe(webroot, tmp / "serve.log", db=url) as server: ...
    with services.Cluster() as cluster: ...
    with services.Swtpm(tmp / "tpm") as swtpm: ...

Each service starts when constructed and waits until it is ready (its `timeout`
argument bounds the wait, no fixed sleep), keeps its output in a log file whose last
lines end every ServiceError, and leaves no process behind once stopped (its whole
process group is killed). Standard library, `cryptography` and rampart only: no pytest.
"""

from rampart.testbed.services.base import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Service,
    ServiceError,
    free_port,
    http_status,
    log_tail,
    port_open,
    world_readable_tmp,
)
from rampart.testbed.services.nginx import Nginx, find_nginx
from rampart.testbed.services.pki import (
    Authority,
    Cert,
    Pki,
    Validity,
    make_ca,
    make_cert,
    make_pki,
    validity,
    write_key,
)
from rampart.testbed.services.postgres import (
    FAST_SETTINGS,
    Cluster,
    PostgresError,
    postgres_bindir,
)
from rampart.testbed.services.serve import RampartServe, rampart_command
from rampart.testbed.services.swtpm import Swtpm

__all__ = [
    "FAST_SETTINGS",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "Authority",
    "Cert",
    "Cluster",
    "Nginx",
    "Pki",
    "PostgresError",
    "RampartServe",
    "Service",
    "ServiceError",
    "Swtpm",
    "Validity",
    "find_nginx",
    "free_port",
    "http_status",
    "log_tail",
    "make_ca",
    "make_cert",
    "make_pki",
    "port_open",
    "postgres_bindir",
    "rampart_command",
    "validity",
    "world_readable_tmp",
    "write_key",
]
