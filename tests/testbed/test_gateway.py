"""A real IPsec tunnel built from two rendered gateway.toml files, in one testbed
guest (the host kernel has no XFRM interfaces and no AES-GCM/CTR ESP; the guest's
Debian kernel has them).

In the guest: two "machines" a and b, each a network namespace <side>-pub holding
its public interface pub0 (the two joined by a veth pair), the rendered public
ruleset, and a charon (Debian's strongswan.service from charon-systemd, confined by
the rendered drop-in: user strongswan, two capabilities) that joins <side>-pub;
tunnel-up makes <side>-tun with the XFRM interface ipsec1 bound to pub0, as on a
device. Then, between the protected addresses 10.1.0.1 (a-tun) and 10.2.0.1
(b-tun): ping and TCP 7000 pass, encrypted (ESP in UDP 4500, AES-GCM: the SAs and
their counters in <side>-pub); TCP 7001 is dropped in both directions; TCP 7000
from a user other than root is dropped by the owner match.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampart.contracts import exposure
from rampart.gateway import description, render
from rampart.testbed import build, session
from tests.gateway import pki

pytestmark = pytest.mark.vm

CHECKOUT = Path(__file__).resolve().parents[2]
GUEST_DIR = "/run/gw"  # charon's drop-in makes / read-only and /tmp private
CHUNK = 3000
SIDES = {
    "a": {"name": "gw-a", "peer": "gw-b", "address": "192.0.2.1", "peer_address": "192.0.2.2",
          "local": "10.1.0.0/24", "remote": "10.2.0.0/24", "tunnel": "10.1.0.1"},
    "b": {"name": "gw-b", "peer": "gw-a", "address": "192.0.2.2", "peer_address": "192.0.2.1",
          "local": "10.2.0.0/24", "remote": "10.1.0.0/24", "tunnel": "10.2.0.1"},
}  # fmt: skip

SETUP = r"""#!/bin/sh
# Two machines in one guest: <side>-pub namespaces joined by veth, each with the
# rendered ruleset, tunnel namespace and a confined charon. Run from GUEST_DIR.
set -eu
cd "$(dirname "$0")"
here=$(pwd)
ip netns add a-pub
ip netns add b-pub
ip link add pub0 netns a-pub type veth peer name pub0 netns b-pub
# The stand-in for rampart-gateway.service, which the drop-in requires; each side
# also requires its own rampart-gateway-<side>.service (below).
cat >/run/systemd/system/rampart-gateway.service <<EOF
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
EOF
for side in a b; do
    case $side in a) addr=192.0.2.1 ;; b) addr=192.0.2.2 ;; esac
    tree=$here/$side/tree
    ip -n $side-pub link set lo up
    ip -n $side-pub addr add $addr/24 dev pub0
    ip -n $side-pub link set pub0 up
    # The rendered rampart-gateway.service, confinement and all, as
    # rampart-gateway-$side.service: in $side-pub as if it were the machine's own
    # namespace (PrivateMounts=no: NetworkNamespacePath= would otherwise give it a
    # mount namespace, which the real unit does not have), with this side's paths,
    # and without its wait for pub0's device unit (udev does not see $side-pub).
    gwunit=/run/systemd/system/rampart-gateway-$side.service
    sed '/^Wants=/d; /^After=/d' $tree/etc/systemd/system/rampart-gateway.service >$gwunit
    mkdir -p $gwunit.d
    cat >$gwunit.d/60-test.conf <<EOF
[Service]
NetworkNamespacePath=/run/netns/$side-pub
PrivateMounts=no
ExecStart=
ExecStart=/usr/sbin/nft -f $tree/etc/rampart/gateway/public.nft
ExecStart=$tree/etc/rampart/gateway/tunnel-up
ExecStop=
ExecStop=$tree/etc/rampart/gateway/tunnel-down
EOF
    # swanctl --file reads credentials from the directories beside the file.
    sw=$here/$side/swanctl
    mkdir -p $sw/x509 $sw/x509ca $sw/pubkey $sw/rsa $sw/ecdsa $sw/pkcs8 \
        $sw/pkcs12 $sw/x509aa $sw/x509ac $sw/x509crl $sw/x509ocsp $sw/bliss $sw/conf.d
    cp $tree/etc/swanctl/conf.d/rampart.conf $sw/swanctl.conf
    cp $tree/etc/swanctl/x509/* $sw/x509/
    cp $tree/etc/swanctl/x509ca/* $sw/x509ca/
    cat >$here/$side/strongswan.conf <<EOF
include $tree/etc/strongswan.d/charon-rampart.conf
charon {
    plugins {
        vici {
            socket = unix:///run/strongswan-$side/charon.vici
        }
    }
}
swanctl {
    socket = unix:///run/strongswan-$side/charon.vici
}
EOF
    unit=/run/systemd/system/strongswan-$side.service
    cp /lib/systemd/system/strongswan.service $unit
    mkdir -p $unit.d
    cp $tree/etc/systemd/system/strongswan.service.d/50-rampart.conf $unit.d/
    cat >$unit.d/60-test.conf <<EOF
[Unit]
Requires=rampart-gateway-$side.service
After=rampart-gateway-$side.service
[Service]
NetworkNamespacePath=/run/netns/$side-pub
Environment=STRONGSWAN_CONF=$here/$side/strongswan.conf
RuntimeDirectory=strongswan-$side
ExecStartPost=
ExecStartPost=+/usr/sbin/swanctl --load-all --noprompt --file $sw/swanctl.conf
EOF
done
systemctl daemon-reload
systemctl start strongswan-a.service strongswan-b.service
"""

# A TCP echo server (one line back per connection) and a client that prints what
# came back, or "timeout"/"refused".
TCP = r"""
import socket, sys
def serve(address, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port)); s.listen(8)
    while True:
        c, _ = s.accept(); c.settimeout(5)
        try:
            c.sendall(c.recv(100).upper())
        except OSError:
            pass
        c.close()
def call(address, port):
    try:
        c = socket.create_connection((address, port), timeout=4)
        c.sendall(b"hello"); print(c.recv(100).decode())
    except socket.timeout:
        print("timeout")
    except ConnectionRefusedError:
        print("refused")
if sys.argv[1] == "serve":
    serve(sys.argv[2], int(sys.argv[3]))
else:
    call(sys.argv[2], int(sys.argv[3]))
"""


def _payload(tmp: Path) -> bytes:
    """A tar.gz of everything the guest needs: the rendered trees, the private keys
    (where the descriptions say), the setup script and the TCP helper."""
    keys = pki.make_pki(tmp / "pki")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for side, s in SIDES.items():
            text = pki.gateway_toml(
                s["name"],
                s["peer"],
                public_interface="pub0",
                public_address=s["address"],
                peer_address=s["peer_address"],
                namespace=f"{side}-tun",
                local=s["local"],
                remote=s["remote"],
                tunnel_address=s["tunnel"],
            ).replace('user = "rampart-fetch"', 'user = "root"')
            path = keys / f"{side}.toml"
            path.write_text(text)
            out = tmp / side / "tree"
            render.write(description.load(path), out)
            tar.add(out, arcname=f"{side}/tree")
            tar.add(keys / f"{s['name']}.key", arcname=f"{side}/swanctl/private/{s['name']}.key")
        for name, content, mode in (("setup.sh", SETUP, 0o755), ("tcp.py", TCP, 0o644)):
            info = tarfile.TarInfo(name)
            data = content.encode()
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def put_payload(machine: session.Guest, payload: bytes) -> None:
    text = base64.b64encode(payload).decode()
    machine.sh(f"rm -rf {GUEST_DIR} {GUEST_DIR}.b64 && mkdir -m 0755 {GUEST_DIR}")
    for start in range(0, len(text), CHUNK):
        machine.sh(f"printf %s '{text[start : start + CHUNK]}' >>{GUEST_DIR}.b64")
    machine.sh(f"base64 -d {GUEST_DIR}.b64 | tar -xz -C {GUEST_DIR} && rm {GUEST_DIR}.b64")


def _tcp(machine: session.Guest, side: str, address: str, port: int, user: str = "") -> str:
    run_as = f"setpriv --reuid {user} --regid nogroup --clear-groups " if user else ""
    return machine.sh(
        f"ip netns exec {side}-tun {run_as}python3 {GUEST_DIR}/tcp.py call {address} {port}",
        60,
    ).strip()


def _sa_packets(machine: session.Guest, side: str) -> int:
    """Packets through the ESP SAs in <side>-pub (both directions)."""
    text = machine.sh(f"ip -n {side}-pub -s xfrm state")
    return sum(int(n) for n in re.findall(r"current:\s*\n?\s*\d+\(bytes\), (\d+)\(packets\)", text))


@pytest.fixture(scope="module")
def bed(time_factor: float) -> build.Testbed:
    return build.build(CHECKOUT, time_factor=time_factor)


@pytest.fixture(scope="module")
def machine(
    bed: build.Testbed, tmp_path_factory: pytest.TempPathFactory, time_factor: float
) -> Iterator[session.Guest]:
    work = tmp_path_factory.mktemp("gateway")
    payload = _payload(work / "payload")
    with session.Guest(bed, work / "guest", time_factor=time_factor) as guest:
        guest.boot()
        guest.wait_system_up()
        put_payload(guest, payload)
        guest.sh(f"sh {GUEST_DIR}/setup.sh", 180)
        for side, port in (("a", 7000), ("a", 7001), ("b", 7000), ("b", 7001)):
            address = SIDES[side]["tunnel"]
            guest.sh(
                f"( ip netns exec {side}-tun python3 {GUEST_DIR}/tcp.py serve {address} {port} "
                ">/dev/null 2>&1 </dev/null & )"
            )
        yield guest


def _udp_owners(machine: session.Guest, side: str) -> dict[int, int]:
    """Local UDP port -> owner uid of the sockets in <side>-pub (/proc/net/udp)."""
    owners: dict[int, int] = {}
    for name in ("udp", "udp6"):
        text = machine.sh(f"ip netns exec {side}-pub cat /proc/net/{name}")
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 7 and ":" in fields[1]:
                owners[int(fields[1].rsplit(":", 1)[1], 16)] = int(fields[7])
    return owners


def test_charon_runs_confined_as_the_strongswan_user(machine: session.Guest) -> None:
    uid = int(machine.sh("id -u strongswan").strip())
    for side in ("a", "b"):
        pid = machine.sh(f"systemctl show -P MainPID strongswan-{side}.service").strip()
        status = machine.sh(f"cat /proc/{pid}/status")
        assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
        found = re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M)
        assert found, status
        # At most CAP_NET_ADMIN (12) and CAP_NET_BIND_SERVICE (10).
        assert int(found[1], 16) & ~((1 << 12) | (1 << 10)) == 0, found[1]
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        # Its IKE sockets are the strongSwan user's: what the public ruleset matches.
        owners = _udp_owners(machine, side)
        assert owners.get(500) == uid and owners.get(4500) == uid, owners
        conns = machine.sh(
            f"STRONGSWAN_CONF={GUEST_DIR}/{side}/strongswan.conf swanctl --list-conns 2>/dev/null"
        )
        assert SIDES[side]["peer"] in conns and "IKEv2" in conns, conns


@pytest.mark.parametrize(
    ("tested", "unit"),
    [
        ("rampart-gateway-a.service", "rampart-gateway.service"),
        ("strongswan-a.service", "strongswan.service"),
    ],
)
def test_the_gateways_units_run_within_their_exposure_goals(
    machine: session.Guest, tested: str, unit: str
) -> None:
    """The running units' scores (the rendered unit and drop-in, with the test's
    drop-in that puts them in a-pub) against the goals of rampart-gateway.service and
    strongswan.service in exposure.toml."""
    assert machine.sh(f"systemctl is-active {tested}").strip() == "active"
    text = machine.sh(f"systemd-analyze security --no-pager {tested} 2>&1", 120)
    goal = {g.unit: g.goal for g in exposure.load()}[unit]
    assert exposure.parse_scores(text)[tested] <= goal, text


def test_gateway_check_passes_on_the_device(machine: session.Guest) -> None:
    """`rampart gateway check` in the guest: its nft, its charon-systemd, its users."""
    for side in ("a", "b"):
        report = json.loads(
            machine.sh(f"rampart gateway check {GUEST_DIR}/{side}/tree --json", 180)
        )
        assert report["ok"] is True and report["problems"] == [], report
        assert any("loaded into charon" in line for line in report["checked"]), report


def test_ping_through_the_tunnel_is_encrypted(machine: session.Guest) -> None:
    deadline = time.monotonic() + 120
    while True:  # the first packets start the IKE negotiation (start_action = trap)
        result = machine.vm.shell("ip netns exec a-tun ping -c 2 -W 3 10.2.0.1", 60)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, result.output
    before = _sa_packets(machine, "a")
    machine.sh("ip netns exec a-tun ping -c 3 -W 3 10.2.0.1")
    assert _sa_packets(machine, "a") >= before + 6  # 3 out, 3 back
    states = machine.sh("ip -n a-pub xfrm state")
    assert states.count("proto esp") == 2, states
    assert states.count("encap type espinudp sport 4500 dport 4500") == 2, states
    assert states.count("aead rfc4106(gcm(aes))") == 2, states
    assert states.count("if_id 0x1") == 2, states
    assert re.search(r"flag .*\besn\b", states), states  # extended sequence numbers
    sas = machine.sh(
        f"STRONGSWAN_CONF={GUEST_DIR}/a/strongswan.conf swanctl --list-sas 2>/dev/null"
    )
    assert "ESTABLISHED, IKEv2" in sas, sas
    assert "AES_GCM_16-256/PRF_HMAC_SHA2_256/ECP_256_BP" in sas, sas
    assert "INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256/ECP_256_BP/ESN" in sas, sas


def test_allowed_tcp_passes_both_ways(machine: session.Guest) -> None:
    assert _tcp(machine, "a", "10.2.0.1", 7000) == "HELLO"
    assert _tcp(machine, "b", "10.1.0.1", 7000) == "HELLO"


def test_a_port_the_rules_do_not_allow_is_dropped_both_ways(machine: session.Guest) -> None:
    # Dropped, not refused (both sides listen on 7001), while 7000 passes.
    for side, address in (("a", "10.2.0.1"), ("b", "10.1.0.1")):
        assert _tcp(machine, side, address, 7000) == "HELLO"
        assert _tcp(machine, side, address, 7001) == "timeout"


def test_the_owner_match_drops_other_users(machine: session.Guest) -> None:
    # tunnel.allow out tcp/7000 is for user root only.
    assert _tcp(machine, "a", "10.2.0.1", 7000) == "HELLO"
    assert _tcp(machine, "a", "10.2.0.1", 7000, user="nobody") == "timeout"


def test_the_tunnel_namespace_reaches_only_the_peer_subnets(machine: session.Guest) -> None:
    """Its only route is through ipsec1; the public network is unreachable from it."""
    routes = machine.sh("ip -n a-tun route")
    assert re.findall(r"dev (\S+)", routes) == ["ipsec1"], routes
    assert machine.vm.shell("ip netns exec a-tun ping -c 1 -W 2 192.0.2.2", 30).returncode != 0
