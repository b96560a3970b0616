"""The roles' SSH keys (rampart.contracts.roles), made by the real ssh-keygen; the
installer's reading of them is tests/device/test_installer.py's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rampart.contracts import roles
from rampart.errors import FormatError


def keygen(tmp_path: Path, kind: str, name: str) -> str:
    path = tmp_path / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"{name}@host", "-f", str(path)],
        check=True,
    )
    return (tmp_path / f"{name}.pub").read_text()


def test_ed25519_keys_are_taken_with_their_comment(tmp_path: Path) -> None:
    one, two = keygen(tmp_path, "ed25519", "one"), keygen(tmp_path, "ed25519", "two")
    keys = roles.parse_authorized_keys(f"# the admins\n\n{one}{two}", "admin.pub")
    assert [key.comment for key in keys] == ["one@host", "two@host"]
    assert roles.authorized_keys(keys) == one + two


@pytest.mark.parametrize(
    ("kind", "edit", "message"),
    [
        ("rsa", None, "'ssh-rsa' is not an accepted key type"),
        ("ecdsa", None, "'ecdsa-sha2-nistp256' is not an accepted key type"),
        ("ed25519", lambda line: 'command="/bin/sh" ' + line, "no options before it"),
        ("ed25519", lambda line: line.split()[0], "without its key"),
        ("ed25519", lambda line: line.replace(" AAAA", " !!!!", 1), "not base64"),
        ("rsa", lambda line: "ssh-ed25519 " + line.split(None, 1)[1], "not a ssh-ed25519 key"),
        ("ed25519", lambda line: line.rstrip("\n") + "\x1b[2J\n", "control characters"),
    ],
)
def test_another_key_type_options_or_a_forged_line_are_refused(
    tmp_path: Path, kind: str, edit: object, message: str
) -> None:
    line = keygen(tmp_path, kind, "k")
    if callable(edit):
        line = edit(line)
    with pytest.raises(FormatError, match=message):
        roles.parse_authorized_keys(line, "admin.pub")
    with pytest.raises(FormatError, match="no key"):
        roles.parse_authorized_keys("# nobody\n", "audit.pub")
