"""gateway.toml: what it accepts, and the one clear line for each thing it refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rampart.errors import ConfigError
from rampart.gateway import description
from tests.gateway import pki


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.make_pki(directory, ("gw-a", "gw-b", "gw-c"))
    return directory


def _load(keys: Path, text: str) -> description.Gateway:
    path = keys / "gateway.toml"
    path.write_text(text)
    return description.load(path)


def _refused(keys: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(keys, text)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{keys / 'gateway.toml'}: "), message
    assert caught.value.exit_code == 6
    return message


def test_the_sample_description_loads_with_strict_defaults(keys: Path) -> None:
    gw = _load(keys, pki.gateway_toml())
    assert gw.name == "gw-a"
    assert gw.identity == "gw-a.example.org"
    assert gw.ike_proposals == ("aes256gcm16-prfsha256-ecp256bp",)
    assert gw.esp_proposals == ("aes256gcm16-ecp256bp-esn",)
    assert not gw.allow_psk
    assert gw.namespace == "ipsec"
    assert gw.user == "strongswan"
    [peer] = gw.peers
    assert (peer.name, peer.if_id, peer.interface, peer.auth) == ("gw-b", 1, "ipsec1", "pubkey")
    assert [str(n) for n in peer.remote_subnets] == ["10.2.0.0/24"]
    assert peer.ca.subject == "CN=Rampart test ca,O=Rampart test"
    assert [(s.direction, s.protocol, s.ports, s.user) for s in gw.tunnel_services] == [
        ("in", "tcp", (7000, 7000), None),
        ("out", "tcp", (7000, 7000), "root"),
    ]


def test_every_allowed_suite_is_accepted(keys: Path) -> None:
    ike = ", ".join(f'"{p}"' for p in description.IKE_PROPOSALS)
    esp = ", ".join(f'"{p}"' for p in description.ESP_PROPOSALS)
    text = pki.gateway_toml() + f"\n[ike]\nproposals = [{ike}]\nesp_proposals = [{esp}]\n"
    gw = _load(keys, text)
    assert gw.ike_proposals == description.IKE_PROPOSALS
    assert gw.esp_proposals == description.ESP_PROPOSALS


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # weak suites
        (
            '[ike]\nproposals = ["aes128-sha1-modp2048"]\n',
            r"ike\.proposals: 'aes128-sha1-modp2048' is not one of the allowed suites "
            r"\(aes256gcm16-prfsha256-ecp256bp, ",
        ),
        (
            '[ike]\nesp_proposals = ["aes256gcm16-ecp256bp"]\n',
            r"ike\.esp_proposals: 'aes256gcm16-ecp256bp' is not one of the allowed suites",
        ),
        (
            '[ike]\nesp_proposals = ["aes256gcm16-modp1024-esn"]\n',
            r"ike\.esp_proposals: 'aes256gcm16-modp1024-esn' is not one of",
        ),
        ("[ike]\nproposals = []\n", r"ike\.proposals: must not be empty"),
        # IKEv1
        ("[ike]\nversion = 1\n", r"ike\.version: IKEv1 is refused: only IKEv2 is supported"),
        # unknown key (a typo must not pass)
        ('[ike]\nproposal = "x"\n', r"ike\.proposal: unknown key"),
    ],
)
def test_weak_or_old_ike_is_refused(keys: Path, extra: str, expected: str) -> None:
    message = _refused(keys, pki.gateway_toml() + "\n" + extra)
    assert re.search(expected, message), message


def test_psk_without_opt_in_is_refused(keys: Path) -> None:
    text = pki.gateway_toml(extra='auth = "psk"\npsk_file = "gw-b.psk"\n')
    message = _refused(keys, text)
    assert message.endswith(
        "peer[0].auth: a pre-shared key needs the explicit opt-in ike.allow_psk = true"
    ), message


def test_psk_with_opt_in_is_accepted_and_names_its_file(keys: Path) -> None:
    text = pki.gateway_toml(extra='auth = "psk"\npsk_file = "gw-b.psk"\n')
    gw = _load(keys, text + "\n[ike]\nallow_psk = true\n")
    assert gw.peers[0].auth == "psk"
    assert gw.peers[0].psk_file == keys / "gw-b.psk"


def test_missing_certificate_is_refused(keys: Path) -> None:
    text = pki.gateway_toml().replace('certificate = "gw-a.pem"', 'certificate = "gone.pem"')
    message = _refused(keys, text)
    assert message.endswith(f"identity.certificate: {keys / 'gone.pem'}: no such file"), message


def test_a_key_instead_of_a_certificate_is_refused(keys: Path) -> None:
    text = pki.gateway_toml().replace('certificate = "gw-a.pem"', 'certificate = "gw-a.key"')
    message = _refused(keys, text)
    assert message.endswith(
        f"identity.certificate: {keys / 'gw-a.key'}: not an X.509 certificate in PEM"
    ), message


def test_an_identity_the_certificate_does_not_carry_is_refused(keys: Path) -> None:
    text = pki.gateway_toml().replace('id = "gw-a.example.org"', 'id = "gw-z.example.org"')
    message = _refused(keys, text)
    assert "identity.id: 'gw-z.example.org' is neither a subjectAltName nor the subject" in message
    assert "(it has: gw-a.example.org)" in message


@pytest.mark.parametrize("port", ["0", "65536", "-1", "[10, 9]", '"ssh"'])
def test_port_out_of_range_is_refused(keys: Path, port: str) -> None:
    text = pki.gateway_toml().replace("port = 7000\n", f"port = {port}\n", 1)
    message = _refused(keys, text)
    assert "tunnel.allow[0].port: " in message, message


def test_port_range_is_accepted(keys: Path) -> None:
    text = pki.gateway_toml().replace("port = 7000\n", "port = [7000, 7010]\n", 1)
    assert _load(keys, text).tunnel_services[0].port_text == "7000-7010"


def test_ike_ports_cannot_be_opened_as_a_public_service(keys: Path) -> None:
    text = pki.gateway_toml().replace("port = 53\n", "port = [400, 600]\n")
    message = _refused(keys, text)
    assert message.endswith(
        "public.allow[0].port: UDP 500 and 4500 are IKE and NAT-T, open only to the strongSwan user"
    ), message


def test_overlapping_remote_subnets_of_two_peers_are_refused(keys: Path) -> None:
    second = """
[[peer]]
name = "gw-c"
address = "192.0.2.3"
id = "gw-c.example.org"
local_subnets = ["10.1.0.0/24"]
remote_subnets = ["10.2.0.128/25"]
"""
    message = _refused(keys, pki.gateway_toml() + second)
    assert message.endswith(
        "peer[1].remote_subnets: 10.2.0.128/25 overlaps 10.2.0.0/24 of peer 'gw-b'"
    ), message


def test_local_and_remote_selectors_overlapping_are_refused(keys: Path) -> None:
    message = _refused(keys, pki.gateway_toml(remote="10.0.0.0/8"))
    assert message.endswith(
        "peer[0].remote_subnets: 10.0.0.0/8 overlaps the local subnet 10.1.0.0/24"
    ), message


def test_a_tunnel_address_outside_the_selectors_is_refused(keys: Path) -> None:
    message = _refused(keys, pki.gateway_toml(tunnel_address="10.9.0.1"))
    assert "tunnel.address: 10.9.0.1 is in none of peer 'gw-b''s local_subnets" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('address = "192.0.2.2"', 'address = "not a host!"', r"peer\[0\]\.address: .* neither"),
        ('remote_subnets = ["10.2.0.0/24"]', 'remote_subnets = ["10.2.0.1/24"]', r"not a network"),
        ('name = "gw-b"', 'name = "Bad_Name"', r"peer\[0\]\.name: 'Bad_Name' is not a name"),
        (
            'user = "strongswan"',
            'user = "root"',
            r"strongswan\.user: strongSwan must not run as root",
        ),
        (
            'interface = "eth0"',
            'interface = "eth0; rm"',
            r"public\.interface: .* not a network interface",
        ),
        ('id = "gw-b.example.org"', 'id = "a\\"b"', r"peer\[0\]\.id: .* is not an IKE identity"),
    ],
)
def test_malformed_values_are_refused(keys: Path, old: str, new: str, expected: str) -> None:
    text = pki.gateway_toml()
    assert old in text
    message = _refused(keys, text.replace(old, new, 1))
    assert re.search(expected, message), message


def test_no_peer_is_refused(keys: Path) -> None:
    text = pki.gateway_toml().split("[[peer]]")[0]
    assert _refused(keys, text).endswith("peer: at least one [[peer]] is required")


def test_a_private_key_path_is_refused(keys: Path) -> None:
    """The key stays in swanctl's private directory; a description never names it."""
    text = pki.gateway_toml().replace('ca = "ca.pem"', 'ca = "ca.pem"\nkey = "gw-a.key"')
    assert _refused(keys, text).endswith("identity.key: unknown key")


def test_invalid_toml_is_one_line(keys: Path) -> None:
    assert "invalid TOML" in _refused(keys, "name = \n")


def test_a_missing_description_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.toml: no such file$"):
        description.load(tmp_path / "gateway.toml")
