"""The IPsec gateway: one declarative `gateway.toml` rendered into a strict strongSwan
(swanctl) configuration, nftables rulesets for the public side and for the tunnel
network namespace, the scripts and systemd units that create the namespace and its
XFRM interfaces, and a drop-in that confines the strongSwan daemon.

    description   gateway.toml -> a validated `Gateway` (refuses weak suites, IKEv1,
                  PSK without opt-in, overlapping selectors, missing certificates)
    render        `Gateway` -> the files, deterministically
    check         the rendered files through the real tools (nft -c, charon + swanctl)

See docs/gateway.md for the file format and the layout of the output.
"""
