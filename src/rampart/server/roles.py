"""Who may do what on the server: the role an admin token (and a dashboard session
opened with it) carries (docs/server.md "Roles").

    auditor   reads everything: the fleet, channels, machines, metrics, the audit trail
    operator  and changes channels, rollouts and machines (assign, admit, reject)
    admin     and everything else: tokens, the attestation policy, admission settings

Each role may do what the one before it may: `allows(role, needed)`.
"""

from __future__ import annotations

from rampart.errors import UsageError

AUDITOR, OPERATOR, ADMIN = "auditor", "operator", "admin"
ROLES = (AUDITOR, OPERATOR, ADMIN)  # from the least to the most trusted


def check(role: str) -> str:
    """`role` if it is one of ROLES; UsageError otherwise."""
    if role not in ROLES:
        raise UsageError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def allows(role: str, needed: str) -> bool:
    """Whether a token of `role` may do what needs `needed`."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(check(needed))


# Paths whose every method needs an admin (none of today's API: tokens are made with
# the CLI; the routes that manage them, the attestation policy and admission
# settings are added under these).
ADMIN_PREFIXES = ("/admin/api/tokens", "/admin/api/settings")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def needed(method: str, path: str) -> str:
    """The least role a request needs: admin under ADMIN_PREFIXES, an auditor to read,
    an operator to change anything else."""
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES):
        return ADMIN
    return AUDITOR if method in _READS else OPERATOR
