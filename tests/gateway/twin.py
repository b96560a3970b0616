"""Compare a rendering with a clean one of the same gateway.

`twin(gw)` is the same `Gateway` with every free-text value (names, interfaces,
users, identities, host names, paths, IPv6 scope ids) replaced by a harmless
placeholder `qz<N>zq`: the same peers, addresses, networks, ports and options, so
the renderer takes the same decisions. `assert_same_structure(hostile, clean,
back)` parses both renderings (tests/gateway/structure.py) and asserts they are
equal once each placeholder is put back to the value it stands for: the same
files, the same swanctl keys and sections with the same values, the same nft
statements token by token, the same commands word by word. A value that added a
key, a rule or a command, or that was cut or merged with its neighbour, fails it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

from rampart.gateway import description, render
from tests.gateway import structure


class Placeholders:
    def __init__(self) -> None:
        self.back: dict[str, str] = {}
        self._by_value: dict[tuple[str, str], str] = {}

    def __call__(self, value: str, fmt: str = "{}") -> str:
        if not value:  # the renderer treats "" as absent: the twin keeps it
            return value
        key = (fmt, value)
        if key not in self._by_value:
            placeholder = fmt.format(f"qz{len(self._by_value)}zq")
            self._by_value[key] = placeholder
            self.back[placeholder] = value
        return self._by_value[key]

    def address(self, address: description.Address) -> description.Address:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            plain = ipaddress.IPv6Address(int(address))
            scope = self(address.scope_id)
            return ipaddress.IPv6Address(f"{plain}%{scope}")
        return address

    def network(self, network: description.Network) -> description.Network:
        address = network.network_address
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            plain = ipaddress.IPv6Address(int(address))
            scope = self(address.scope_id)
            return ipaddress.IPv6Network(f"{plain}%{scope}/{network.prefixlen}")
        return network


def _is_ip(text: str) -> bool:
    if "%" in text:
        return False
    try:
        ipaddress.ip_network(text)
    except ValueError:
        return False
    return True


def twin(gw: description.Gateway) -> tuple[description.Gateway, Callable[[str], str]]:
    """(the clean twin, a function that puts the original values back into a text)."""
    ph = Placeholders()

    def service(s: description.Service) -> description.Service:
        return dataclasses.replace(
            s,
            user=ph(s.user) if s.user is not None else None,
            peer=ph(s.peer) if s.peer is not None else None,
            networks=tuple(ph.network(n) for n in s.networks),
        )

    def peer(p: description.Peer) -> description.Peer:
        return dataclasses.replace(
            p,
            name=ph(p.name),
            address=p.address if _is_ip(p.address) else ph(p.address, "{}.example"),
            identity=ph(p.identity),
            local_subnets=tuple(ph.network(n) for n in p.local_subnets),
            remote_subnets=tuple(ph.network(n) for n in p.remote_subnets),
            psk_file=Path(ph(str(p.psk_file), "/{}")) if p.psk_file is not None else None,
        )

    clean = dataclasses.replace(
        gw,
        name=ph(gw.name),
        source=Path("/nonexistent/gateway.toml"),
        public_interface=ph(gw.public_interface),
        public_addresses=tuple(ph.address(a) for a in gw.public_addresses),
        public_services=tuple(service(s) for s in gw.public_services),
        namespace=ph(gw.namespace),
        tunnel_address=ph.address(gw.tunnel_address),
        lan_interface=ph(gw.lan_interface) if gw.lan_interface is not None else None,
        tunnel_services=tuple(service(s) for s in gw.tunnel_services),
        identity=ph(gw.identity),
        user=ph(gw.user),
        peers=tuple(peer(p) for p in gw.peers),
    )
    back = dict(ph.back)
    if not back:
        return clean, lambda text: text
    pattern = re.compile("|".join(re.escape(k) for k in sorted(back, key=len, reverse=True)))

    def put_back(text: str) -> str:
        return pattern.sub(lambda m: back[m.group()], text)

    return clean, put_back


def _text(rendered: render.Rendered, rel: str) -> str:
    return rendered.files[rel][0].decode()


def assert_same_structure(
    hostile: render.Rendered, clean: render.Rendered, back: Callable[[str], str]
) -> None:
    assert set(hostile.files) == {back(rel) for rel in clean.files}
    for rel in clean.files:
        h_rel = back(rel)
        assert hostile.files[h_rel][1] == clean.files[rel][1], rel
        if rel.endswith(".pem"):
            assert hostile.files[h_rel][0] == clean.files[rel][0], rel
            continue
        h, c = _text(hostile, h_rel), _text(clean, rel)
        if rel in (render.SWANCTL_CONF, render.CHARON_CONF):
            h_settings, h_sections = structure.swanctl(h)
            c_settings, c_sections = structure.swanctl(c)
            assert h_settings == [
                structure.Setting(s.depth, s.key, back(s.value)) for s in c_settings
            ], rel
            assert h_sections == [(d, back(name)) for d, name in c_sections], rel
        elif rel.endswith(".nft"):
            assert structure.nft(h) == [
                tuple(back(t) for t in stmt) for stmt in structure.nft(c)
            ], rel
        elif rel in (render.TUNNEL_UP, render.TUNNEL_DOWN):
            assert structure.shell(h) == [
                structure.Command(tuple(back(w) for w in cmd.words), cmd.specials)
                for cmd in structure.shell(c)
            ], rel
        elif rel in (render.SERVICE, render.DROPIN):
            assert structure.unit(h) == structure.unit(c), rel
        elif rel == render.SYSUSERS:
            assert structure.sysusers(h) == [
                [back(f) for f in line] for line in structure.sysusers(c)
            ], rel
        elif rel == render.MANIFEST:
            h_names = sorted(line.split("  ", 1)[1] for line in h.splitlines())
            c_names = sorted(back(line.split("  ", 1)[1]) for line in c.splitlines())
            assert h_names == c_names, rel
        else:
            raise AssertionError(f"{rel}: no structural comparison for this file")
