"""A test CA and ECDSA P-256 certificates for gateways (rampart.testbed.services, made
with `cryptography`, the same library the description uses to read them), and
gateway.toml writers.

`make_pki(directory, names)` writes ca.pem, ca.key and, per name, <name>.pem and
<name>.key (mode 0600) with subjectAltName DNS:<name>.example.org.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from rampart.testbed import services

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
END = datetime.datetime(2036, 1, 1, tzinfo=datetime.UTC)
ORGANIZATION = "Rampart test"


def make_ca(directory: Path, name: str = "ca") -> services.Authority:
    return services.make_ca(
        directory,
        name,
        common_name=f"{ORGANIZATION} {name}",
        organization=ORGANIZATION,
        valid=(START, END),
    )


def make_host(directory: Path, name: str, ca: services.Authority) -> None:
    """<name>.pem and <name>.key: a server and client certificate for <name>.example.org."""
    services.make_cert(
        directory,
        name,
        ca,
        [f"{name}.example.org"],
        usage="peer",
        organization=ORGANIZATION,
        valid=(START, END),
    )


def make_pki(directory: Path, names: tuple[str, ...] = ("gw-a", "gw-b")) -> Path:
    ca = make_ca(directory)
    for name in names:
        make_host(directory, name, ca)
    return directory


def gateway_toml(
    name: str = "gw-a",
    peer: str = "gw-b",
    *,
    public_interface: str = "eth0",
    public_address: str = "192.0.2.1",
    peer_address: str = "192.0.2.2",
    namespace: str = "ipsec",
    local: str = "10.1.0.0/24",
    remote: str = "10.2.0.0/24",
    tunnel_address: str = "10.1.0.1",
    user: str = "strongswan",
    extra: str = "",
) -> str:
    """A complete, valid description of `name` facing `peer`; `extra` is appended."""
    return f"""\
name = "{name}"

[identity]
id = "{name}.example.org"
certificate = "{name}.pem"
ca = "ca.pem"

[public]
interface = "{public_interface}"
addresses = ["{public_address}"]
ping = true

[[public.allow]]
direction = "out"
protocol = "udp"
port = 53
user = "rampart-fetch"

[tunnel]
namespace = "{namespace}"
address = "{tunnel_address}"

[[tunnel.allow]]
direction = "in"
protocol = "tcp"
port = 7000

[[tunnel.allow]]
direction = "out"
protocol = "tcp"
port = 7000
user = "root"

[strongswan]
user = "{user}"

[[peer]]
name = "{peer}"
address = "{peer_address}"
id = "{peer}.example.org"
local_subnets = ["{local}"]
remote_subnets = ["{remote}"]
{extra}"""
