"""The roles that administer a Rampart Core over SSH, and where their keys live: the
names that the installer, the Core's sshd configuration and sudo rules
(rampart/data/roles/) and the testbed must agree on. docs/hardening.md "Roles".

- `admin` changes what an administrator owns (the remote configuration, the update,
  the one-shot boot, the state key's sealing, a reboot) and nothing else;
- `audit` reads (the journal, the status of the updates and the TPM, the gateway's
  state) and changes nothing.

Each role logs in with its keys only. The installer writes them from the payload
(`ssh/<role>.pub`, authorized_keys lines) to the state partition, AUTHORIZED_KEYS_DIR
/<role>, where the Core's sshd reads them; the SSH host key is made on the state
partition at the first boot (HOST_KEY). Only the key types in KEY_TYPES are
accepted: Ed25519, on a file or a security key.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

from rampart.contracts.layout import STATE_MOUNT
from rampart.errors import FormatError

ROLES = ("admin", "audit")
# Below the state partition's root (mounted on STATE_MOUNT in Core).
AUTHORIZED_KEYS_DIR = "etc/ssh/authorized_keys"
HOST_KEY = "etc/ssh/ssh_host_ed25519_key"
AUTHORIZED_KEYS_PATH = f"{STATE_MOUNT}/{AUTHORIZED_KEYS_DIR}"  # sshd's AuthorizedKeysFile
HOST_KEY_PATH = f"{STATE_MOUNT}/{HOST_KEY}"
KEY_TYPES = ("ssh-ed25519", "sk-ssh-ed25519@openssh.com")
MAX_KEYS_BYTES = 64 * 1024  # a role's authorized_keys file
_MAX_KEYS = 64


@dataclass(frozen=True)
class PublicKey:
    kind: str
    blob: bytes
    comment: str

    def line(self) -> str:
        text = f"{self.kind} {base64.b64encode(self.blob).decode()}"
        return f"{text} {self.comment}" if self.comment else text


def parse_authorized_keys(text: str, where: str) -> list[PublicKey]:
    """The keys of an authorized_keys text: one `<type> <base64> [comment]` per line,
    blank lines and `#` comments skipped. Options before the type (`command=`,
    `from=`...) are refused: a role's rights are the sudo rules', not a key's. Each
    key must be of KEY_TYPES, its blob naming the same type. FormatError, naming the
    line, otherwise; at least one key."""
    keys: list[PublicKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        kind = fields[0]
        if kind not in KEY_TYPES:
            raise FormatError(
                f"{where}:{number}: {kind[:40]!r} is not an accepted key type "
                f"({', '.join(KEY_TYPES)}; no options before it)"
            )
        if len(fields) < 2:
            raise FormatError(f"{where}:{number}: {kind} without its key")
        blob = _blob(fields[1], f"{where}:{number}")
        if _blob_type(blob) != kind:
            raise FormatError(f"{where}:{number}: the key's data is not a {kind} key")
        comment = fields[2].strip() if len(fields) > 2 else ""
        if not comment.isprintable():
            raise FormatError(f"{where}:{number}: the comment has control characters")
        keys.append(PublicKey(kind, blob, comment))
        if len(keys) > _MAX_KEYS:
            raise FormatError(f"{where}: more than {_MAX_KEYS} keys")
    if not keys:
        raise FormatError(f"{where}: no key")
    return keys


def authorized_keys(keys: list[PublicKey]) -> str:
    """The authorized_keys text the Core's sshd reads: the keys, nothing else."""
    return "".join(key.line() + "\n" for key in keys)


def _blob(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{where}: the key is not base64") from None


def _blob_type(blob: bytes) -> str | None:
    """The key type the blob starts with (an SSH string: length, then the name)."""
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > 64 or len(blob) < 4 + length:
        return None
    try:
        return blob[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None
