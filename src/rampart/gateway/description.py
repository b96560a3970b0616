"""gateway.toml: the declarative description of an IPsec gateway (or client).

`load(path)` reads and validates it into a `Gateway`; every problem is a
`ConfigError` with one line: the file, the key, and why. What is refused, and
stays refused whatever the file says:

- IKEv1 (`ike.version` other than 2);
- any proposal outside the strict list (`IKE_PROPOSALS`, `ESP_PROPOSALS`):
  AES-256-GCM-16, or AES-256-CTR with HMAC-SHA-256, PRF SHA-256, Brainpool P-256
  or NIST P-256, and extended sequence numbers for ESP;
- a pre-shared key without `ike.allow_psk = true`;
- overlapping traffic selectors: two peers whose remote subnets overlap, or a
  peer whose local and remote subnets overlap;
- a certificate or CA that is missing or not an X.509 PEM certificate, an
  identity that the certificate does not carry;
- ports out of 1-65535, unknown keys (a typo in a firewall must not pass unseen);
- any value outside its allow-list. Every string that reaches a rendered file
  (swanctl.conf, the nftables rulesets, the shell scripts, the units) is checked
  here by character set and length: names, interface names (the kernel's IFNAMSIZ
  rules, stricter), user names, IKE identities (FQDN, e-mail, IP address or DN),
  paths, IP addresses and networks without IPv6 scope ids (`%...`, which Python's
  parser accepts with any character in them), and the description's own file name
  (it is in every file's header). The renderer quotes each value again for its
  format (`render`), but this is the primary defence.

The format is documented in docs/gateway.md.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from rampart.errors import ConfigError

# IKE: encryption-[integrity-]PRF-DH. AES-256-GCM needs no integrity algorithm.
IKE_PROPOSALS = (
    "aes256gcm16-prfsha256-ecp256bp",
    "aes256gcm16-prfsha256-ecp256",
    "aes256ctr-sha256-prfsha256-ecp256bp",
    "aes256ctr-sha256-prfsha256-ecp256",
)
# ESP: the DH group is the PFS group of CHILD_SA rekeyings; "esn" is required.
ESP_PROPOSALS = (
    "aes256gcm16-ecp256bp-esn",
    "aes256gcm16-ecp256-esn",
    "aes256ctr-sha256-ecp256bp-esn",
    "aes256ctr-sha256-ecp256-esn",
)
DEFAULT_IKE_PROPOSALS = ("aes256gcm16-prfsha256-ecp256bp",)
DEFAULT_ESP_PROPOSALS = ("aes256gcm16-ecp256bp-esn",)

# Allowed ICMP types, by family; `ping` adds echo-request/echo-reply.
ICMP_TYPES = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMPV6_TYPES = (
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
)
# Neighbour discovery, only on the public side (the XFRM interfaces have no link layer).
ICMPV6_ND_TYPES = ("nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-advert")

IKE_PORT = 500
NAT_T_PORT = 4500

_NAME = re.compile(r"[a-z][a-z0-9-]{0,9}", re.ASCII)  # ipsec<N>, file and conn names
# Linux accepts 1-15 bytes without "/", ":" or whitespace (dev_valid_name); this is
# stricter: no leading "-" or "." (an option to `ip`, or "." and ".."), no shell or
# nft metacharacter, no "*" (a wildcard in nft's iifname).
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", re.ASCII)  # IFNAMSIZ - 1
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=[^\n]{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*", re.ASCII)
# IKE identities (what swanctl's `id` says), each a quoted string in swanctl.conf:
# an FQDN (a host name as above), an e-mail address (local part of letters, digits
# and . _ + -, then a host name), an IP address (without scope id), or a DN in
# RFC 4514 order (`CN=gw-a.example.org,O=Example`: attribute types of letters,
# digits and dots; values of letters, digits, space and . _ - @ : ( ) ', neither
# starting nor ending with a space), at most 255 characters in all.
_EMAIL = re.compile(rf"[A-Za-z0-9._+-]{{1,64}}@{_LABEL}(?:\.{_LABEL})*", re.ASCII)
_RDN_VALUE = r"[A-Za-z0-9._@:()'-](?:[A-Za-z0-9 ._@:()'-]*[A-Za-z0-9._@:()'-])?"
_RDN = rf"[A-Za-z][A-Za-z0-9.]{{0,31}}={_RDN_VALUE}"
_DN = re.compile(rf"{_RDN}(?:, ?{_RDN})*", re.ASCII)
IDENTITY_MAX = 255
# Paths: letters, digits and . _ - + @ / (no space, quote, glob or escape
# character: swanctl's `include` takes a glob pattern), at most PATH_MAX - 1 bytes
# and NAME_MAX per component.
_PATH = re.compile(r"[A-Za-z0-9._+@/-]{1,4095}", re.ASCII)
_PATH_COMPONENT_MAX = 255
# The description's own file name is written into the header comment of every
# rendered file: printable ASCII without backslash (a line continuation in units).
_SOURCE_NAME = re.compile(r"[ -\[\]-~]{1,255}", re.ASCII)
_SHOWN_MAX = 60


def shown(value: str) -> str:
    """`value` for a one-line message: quoted, every character that is not printable
    escaped (newlines, NUL, escape sequences, Unicode line separators), and cut
    after 60 characters."""
    if len(value) > _SHOWN_MAX:
        return f"{value[:_SHOWN_MAX]!r}... ({len(value)} characters)"
    return repr(value)


def one_line(text: str) -> str:
    """`text` with every character that is not printable escaped: a message that
    names a key or a value from the file stays one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate read from a PEM file."""

    path: Path
    pem: bytes
    subject: str
    names: frozenset[str]  # subjectAltNames (DNS, e-mail, IP) and the subject's CN


@dataclass(frozen=True)
class Service:
    """A flow allowed through the firewall."""

    direction: str  # "in" | "out"
    protocol: str  # "tcp" | "udp"
    ports: tuple[int, int]  # first, last (equal for one port)
    user: str | None  # owning user of the local socket (direction "out")
    peer: str | None  # tunnel side: only to/from this peer
    networks: tuple[Network, ...]  # public side: only to/from these networks (empty: any)

    @property
    def port_text(self) -> str:
        first, last = self.ports
        return str(first) if first == last else f"{first}-{last}"


@dataclass(frozen=True)
class Peer:
    name: str
    address: str  # IP address or host name
    identity: str
    ca: Certificate
    local_subnets: tuple[Network, ...]
    remote_subnets: tuple[Network, ...]
    if_id: int
    auth: str  # "pubkey" | "psk"
    psk_file: Path | None

    @property
    def interface(self) -> str:
        return f"ipsec{self.if_id}"


@dataclass(frozen=True)
class Gateway:
    name: str
    source: Path
    # [public]
    public_interface: str
    public_addresses: tuple[Address, ...]  # local IKE addresses (empty: any)
    public_ping: bool
    public_services: tuple[Service, ...]
    # [tunnel]
    namespace: str
    tunnel_address: Address
    lan_interface: str | None
    tunnel_ping: bool
    tunnel_services: tuple[Service, ...]
    # [identity]
    identity: str
    certificate: Certificate
    # [ike]
    ike_proposals: tuple[str, ...]
    esp_proposals: tuple[str, ...]
    allow_psk: bool
    # [strongswan]
    user: str
    # [log]
    log_level: int
    log_drops: bool
    peers: tuple[Peer, ...]


class _Table:
    """One TOML table, read key by key; unknown keys are an error at `done()`."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def fail(self, key: str, why: str) -> ConfigError:
        where = f"{self.where}.{key}" if self.where else key
        return ConfigError(one_line(f"{where}: {why}"))

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.fail(key, "missing (required)")
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_kind(value)}")
        return value

    def skip(self, key: str) -> None:
        self.seen.add(key)

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.fail(key, "missing (required)")
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, not {_kind(value)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def texts(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.fail(key, "missing (required)")
            return default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a string or a list of strings")
        if not value:
            raise self.fail(key, "must not be empty")
        return tuple(value)

    def table(self, key: str) -> _Table:
        value = self.raw(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {_kind(value)}")
        return _Table(value, f"{self.where}.{key}" if self.where else key)

    def tables(self, key: str) -> list[_Table]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, "must be an array of tables ([[...]])")
        prefix = f"{self.where}.{key}" if self.where else key
        return [_Table(v, f"{prefix}[{i}]") for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _name(table: _Table, key: str, default: str | None = None) -> str:
    value = table.text(key, default)
    if not _NAME.fullmatch(value):
        raise table.fail(
            key, f"{shown(value)} is not a name (a lowercase letter, then up to 9 of a-z 0-9 -)"
        )
    return value


def _ifname(table: _Table, key: str) -> str:
    value = table.text(key)
    if not _IFNAME.fullmatch(value):
        raise table.fail(
            key,
            f"{shown(value)} is not a network interface name "
            "(1 to 15 of A-Z a-z 0-9 _ . -, starting with a letter or digit)",
        )
    return value


def _user(table: _Table, key: str, default: str | None = None) -> str:
    value = table.text(key, default)
    if not _USER.fullmatch(value):
        raise table.fail(
            key, f"{shown(value)} is not a user name ([a-z_] then up to 31 of a-z 0-9 _ -)"
        )
    return value


def _scope_id_refused(table: _Table, key: str, text: str) -> None:
    if "%" in text:
        raise table.fail(key, f"{shown(text)}: IPv6 scope ids (%...) are not allowed")


def _network(table: _Table, key: str, text: str) -> Network:
    _scope_id_refused(table, key, text)
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        # ipaddress's reason repeats the value: only for a short one.
        reason = f" ({one_line(str(exc))})" if len(text) <= _SHOWN_MAX else ""
        raise table.fail(key, f"{shown(text)} is not a network in CIDR notation{reason}") from None
    return network


def _networks(
    table: _Table, key: str, default: tuple[str, ...] | None = None
) -> tuple[Network, ...]:
    return tuple(_network(table, key, text) for text in table.texts(key, default))


def _parse_address(text: str) -> Address | None:
    """An IP address without scope id, or None."""
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _address(table: _Table, key: str, text: str) -> Address:
    _scope_id_refused(table, key, text)
    address = _parse_address(text)
    if address is None:
        raise table.fail(key, f"{shown(text)} is not an IP address")
    return address


def _identity(table: _Table, key: str) -> str:
    value = table.text(key)
    if not (
        len(value) <= IDENTITY_MAX
        and (
            _HOSTNAME.fullmatch(value)
            or _EMAIL.fullmatch(value)
            or _DN.fullmatch(value)
            or _parse_address(value) is not None
        )
    ):
        raise table.fail(
            key,
            f"{shown(value)} is not an IKE identity (an FQDN, an e-mail address, an IP "
            "address, or a DN such as CN=host,O=Org; see docs/gateway.md)",
        )
    return value


def _checked_path(table: _Table, key: str, text: str) -> None:
    if not _PATH.fullmatch(text) or any(
        len(part) > _PATH_COMPONENT_MAX for part in text.split("/")
    ):
        raise table.fail(
            key,
            f"{shown(text)} is not a file path (1 to 4095 of A-Z a-z 0-9 . _ - + @ /, "
            "at most 255 between slashes)",
        )


def _path(table: _Table, key: str, base: Path) -> Path:
    text = table.text(key)
    _checked_path(table, key, text)
    return (base / text) if not text.startswith("/") else Path(text)


def read_certificate(table: _Table, key: str, base: Path) -> Certificate:
    path = _path(table, key, base)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise table.fail(key, f"{path}: no such file") from None
    except OSError as exc:
        raise table.fail(key, f"{path}: cannot read: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise table.fail(key, f"{path}: not an X.509 certificate in PEM") from None
    names: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.update(san.get_values_for_type(x509.DNSName))
        names.update(san.get_values_for_type(x509.RFC822Name))
        names.update(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        pass
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        names.add(str(attribute.value))
    # What is copied into the output is the certificate re-encoded, not the file:
    # whatever else the file holds (text, more blocks) does not reach the output.
    canonical = cert.public_bytes(serialization.Encoding.PEM)
    return Certificate(path, canonical, cert.subject.rfc4514_string(), frozenset(names))


def _ports(table: _Table) -> tuple[int, int]:
    raw = table.raw("port")
    if raw is None:
        raise table.fail("port", "missing (required)")
    if isinstance(raw, int) and not isinstance(raw, bool):
        first = last = raw
    elif (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) for p in raw)
    ):
        first, last = raw
    else:
        raise table.fail("port", "must be a port number or [first, last]")
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise table.fail("port", f"{port} is out of range (1-65535)")
    if first > last:
        raise table.fail("port", f"[{first}, {last}] is an empty range")
    return first, last


def _service(table: _Table, *, tunnel: bool, peers: set[str]) -> Service:
    direction = table.text("direction")
    if direction not in ("in", "out"):
        raise table.fail("direction", f'{shown(direction)} is neither "in" nor "out"')
    protocol = table.text("protocol")
    if protocol not in ("tcp", "udp"):
        raise table.fail("protocol", f'{shown(protocol)} is neither "tcp" nor "udp"')
    ports = _ports(table)
    table.skip("user")
    user = _user(table, "user") if "user" in table.data else None
    if user is not None and direction != "out":
        raise table.fail("user", 'only applies to "out" (the owner of a local socket)')
    peer: str | None = None
    networks: tuple[Network, ...] = ()
    if tunnel:
        if "peer" in table.data:
            peer = table.text("peer")
            if peer not in peers:
                raise table.fail("peer", f"{shown(peer)} is not a [[peer]] name")
    elif "networks" in table.data:
        networks = _networks(table, "networks")
    if (
        protocol == "udp"
        and not tunnel
        and set(range(ports[0], ports[1] + 1))
        & {
            IKE_PORT,
            NAT_T_PORT,
        }
    ):
        raise table.fail(
            "port", "UDP 500 and 4500 are IKE and NAT-T, open only to the strongSwan user"
        )
    table.done()
    return Service(direction, protocol, ports, user, peer, networks)


def _proposals(
    table: _Table, key: str, allowed: tuple[str, ...], default: tuple[str, ...]
) -> tuple[str, ...]:
    values = table.texts(key, default)
    for value in values:
        if value not in allowed:
            raise table.fail(
                key, f"{shown(value)} is not one of the allowed suites ({', '.join(allowed)})"
            )
    if len(set(values)) != len(values):
        raise table.fail(key, "lists a suite twice")
    return values


def _peer(
    table: _Table, base: Path, default_ca: Certificate | None, allow_psk: bool, index: int
) -> Peer:
    name = _name(table, "name")
    address = _peer_address(table)
    identity = _identity(table, "id")
    auth, psk_file = _peer_auth(table, base, allow_psk)
    ca = _peer_ca(table, base, default_ca)
    local = _networks(table, "local_subnets")
    remote = _networks(table, "remote_subnets")
    for a in local:
        for b in remote:
            if a.version == b.version and a.overlaps(b):
                raise table.fail("remote_subnets", f"{b} overlaps the local subnet {a}")
    if_id = table.integer("if_id", index + 1)
    if not 1 <= if_id <= 0xFFFF:
        raise table.fail("if_id", f"{if_id} is out of range (1-65535)")
    table.done()
    return Peer(name, address, identity, ca, local, remote, if_id, auth, psk_file)


def _peer_address(table: _Table) -> str:
    address = table.text("address")
    _scope_id_refused(table, "address", address)
    parsed = _parse_address(address)
    if parsed is not None:
        return str(parsed)
    if not _HOSTNAME.fullmatch(address):
        raise table.fail("address", f"{shown(address)} is neither an IP address nor a host name")
    return address


def _peer_auth(table: _Table, base: Path, allow_psk: bool) -> tuple[str, Path | None]:
    auth = table.text("auth", "pubkey")
    if auth == "psk":
        if not allow_psk:
            raise table.fail(
                "auth", "a pre-shared key needs the explicit opt-in ike.allow_psk = true"
            )
        # A relative psk_file is joined to the description's directory, made
        # absolute: that is what swanctl.conf includes, so it passes the allow-list.
        psk_file = _path(table, "psk_file", base).absolute()
        _checked_path(table, "psk_file", str(psk_file))
        return auth, psk_file
    if auth != "pubkey":
        raise table.fail("auth", f'{shown(auth)} is neither "pubkey" nor "psk"')
    table.skip("psk_file")
    if "psk_file" in table.data:
        raise table.fail("psk_file", 'only applies to auth = "psk"')
    return auth, None


def _peer_ca(table: _Table, base: Path, default_ca: Certificate | None) -> Certificate:
    if "ca" in table.data:
        return read_certificate(table, "ca", base)
    if default_ca is not None:
        table.skip("ca")
        return default_ca
    raise table.fail("ca", "missing (required when identity.ca is not set)")


def parse(doc: dict[str, Any], source: Path) -> Gateway:
    """Validate a parsed gateway.toml; relative paths are relative to its directory."""
    base = source.parent
    if not _SOURCE_NAME.fullmatch(source.name):
        raise ConfigError(
            f"the file name {shown(source.name)} is not 1 to 255 printable ASCII characters "
            "without backslash (it is written into the header of every rendered file)"
        )
    top = _Table(doc, "")
    name = _name(top, "name")
    ike = _ike_section(top.table("ike"))
    identity, certificate, default_ca = _identity_section(top.table("identity"), base)
    peers: list[Peer] = []
    for index, table in enumerate(top.tables("peer")):
        peers.append(_peer(table, base, default_ca, ike["allow_psk"], index))
    if not peers:
        raise ConfigError("peer: at least one [[peer]] is required")
    _check_peers(peers)
    public = _public_section(top.table("public"))
    tunnel = _tunnel_section(top.table("tunnel"), peers, public["public_interface"])
    user = _strongswan_section(top.table("strongswan"))
    log = _log_section(top.table("log"))
    top.done()
    return Gateway(
        name=name,
        source=source,
        identity=identity,
        certificate=certificate,
        user=user,
        peers=tuple(peers),
        **public,
        **tunnel,
        **ike,
        **log,
    )


def _ike_section(ike: _Table) -> dict[str, Any]:
    version = ike.integer("version", 2)
    if version != 2:
        raise ike.fail("version", f"IKEv{version} is refused: only IKEv2 is supported")
    found = {
        "ike_proposals": _proposals(ike, "proposals", IKE_PROPOSALS, DEFAULT_IKE_PROPOSALS),
        "esp_proposals": _proposals(ike, "esp_proposals", ESP_PROPOSALS, DEFAULT_ESP_PROPOSALS),
        "allow_psk": ike.flag("allow_psk", False),
    }
    ike.done()
    return found


def _identity_section(ident: _Table, base: Path) -> tuple[str, Certificate, Certificate | None]:
    identity = _identity(ident, "id")
    certificate = read_certificate(ident, "certificate", base)
    if identity not in certificate.names and identity != certificate.subject:
        raise ident.fail(
            "id",
            f"{shown(identity)} is neither a subjectAltName nor the subject of "
            f"{certificate.path} (it has: "
            f"{', '.join(one_line(n) for n in sorted(certificate.names)) or 'none'})",
        )
    default_ca = read_certificate(ident, "ca", base) if "ca" in ident.data else None
    ident.skip("ca")
    ident.done()
    return identity, certificate, default_ca


def _public_section(public: _Table) -> dict[str, Any]:
    found = {
        "public_interface": _ifname(public, "interface"),
        "public_addresses": tuple(
            _address(public, "addresses", a) for a in public.texts("addresses", ("",)) if a
        ),
        "public_ping": public.flag("ping", False),
        "public_services": tuple(
            _service(t, tunnel=False, peers=set()) for t in public.tables("allow")
        ),
    }
    public.done()
    return found


def _tunnel_section(tunnel: _Table, peers: list[Peer], public_interface: str) -> dict[str, Any]:
    namespace = _name(tunnel, "namespace", "ipsec")
    tunnel_address = _address(tunnel, "address", tunnel.text("address"))
    for peer in peers:
        if not any(tunnel_address in net for net in peer.local_subnets):
            raise tunnel.fail(
                "address",
                f"{tunnel_address} is in none of peer {peer.name!r}'s local_subnets "
                "(its traffic would match no selector)",
            )
    lan_interface = _ifname(tunnel, "lan_interface") if "lan_interface" in tunnel.data else None
    tunnel.skip("lan_interface")
    if lan_interface == public_interface:
        raise tunnel.fail("lan_interface", "is the public interface")
    tunnel_ping = tunnel.flag("ping", True)
    names = {p.name for p in peers}
    tunnel_services = tuple(_service(t, tunnel=True, peers=names) for t in tunnel.tables("allow"))
    tunnel.done()
    return {
        "namespace": namespace,
        "tunnel_address": tunnel_address,
        "lan_interface": lan_interface,
        "tunnel_ping": tunnel_ping,
        "tunnel_services": tunnel_services,
    }


def _strongswan_section(strongswan: _Table) -> str:
    user = _user(strongswan, "user", "strongswan")
    if user == "root":
        raise strongswan.fail("user", "strongSwan must not run as root")
    strongswan.done()
    return user


def _log_section(log: _Table) -> dict[str, Any]:
    log_level = log.integer("level", 1)
    if not -1 <= log_level <= 4:
        raise log.fail("level", f"{log_level} is out of range (-1 to 4, strongSwan's levels)")
    log_drops = log.flag("drops", True)
    log.done()
    return {"log_level": log_level, "log_drops": log_drops}


def _check_peers(peers: list[Peer]) -> None:
    seen_names: set[str] = set()
    seen_ids: dict[int, str] = {}
    for i, peer in enumerate(peers):
        where = f"peer[{i}]"
        if peer.name in seen_names:
            raise ConfigError(f"{where}.name: {peer.name!r} is used by another peer")
        seen_names.add(peer.name)
        if peer.if_id in seen_ids:
            raise ConfigError(
                f"{where}.if_id: {peer.if_id} is also peer {seen_ids[peer.if_id]!r}'s"
            )
        seen_ids[peer.if_id] = peer.name
        for other in peers[:i]:
            for a in peer.remote_subnets:
                for b in other.remote_subnets:
                    if a.version == b.version and a.overlaps(b):
                        raise ConfigError(
                            f"{where}.remote_subnets: {a} overlaps {b} of peer {other.name!r}"
                        )


def load(path: Path) -> Gateway:
    """Read and validate a gateway.toml."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(one_line(f"{path}: no such file")) from None
    except OSError as exc:
        raise ConfigError(one_line(f"{path}: cannot read: {exc.strerror}")) from None
    if len(raw) > 1 << 20:
        raise ConfigError(one_line(f"{path}: larger than 1 MiB"))
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(one_line(f"{path}: invalid TOML: {exc}")) from None
    try:
        return parse(doc, path)
    except ConfigError as exc:
        raise ConfigError(one_line(f"{path}: {exc}")) from None
