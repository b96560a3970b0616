"""What every area's verbs share: the key password's source."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable

from rampart.errors import LocalError

PASSWORD_ENV = "RAMPART_PASSWORD"  # noqa: S105 - the name of a variable, not a secret


def password_source(env_name: str, confirm: bool) -> Callable[[], bytes]:
    """A callable giving the key password: from $env_name, else a terminal prompt."""

    def get() -> bytes:
        value = os.environ.get(env_name)
        if value:
            return value.encode()
        if not sys.stdin.isatty():
            raise LocalError(
                f"no password: set ${env_name} or run on a terminal (or use --unencrypted)"
            )
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password (again): ") != first:
            raise LocalError("the two passwords differ")
        if not first:
            raise LocalError("empty password (use --unencrypted for a key without one)")
        return first.encode()

    return get
