"""The one place that runs subprocesses.

Commands are argv lists (never a shell), stdin is /dev/null unless input is
given, the environment is reduced to what the tool needs, and a failure
becomes a `LocalError` naming the command and its last line of stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rampart.errors import LocalError

log = logging.getLogger(__name__)

_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TERM", "HOME", "TMPDIR")


@dataclass(frozen=True)
class Completed:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    inherit_stderr: bool = False,
) -> Completed:
    """Run `argv`; raise LocalError if it cannot start, times out, or fails while `check`.

    With `inherit_stderr`, the command writes to our stderr (progress bars) and
    `Completed.stderr` is empty.
    """
    full_env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
    full_env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if env:
        full_env.update(env)
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None if inherit_stderr else subprocess.PIPE,
            env=full_env,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LocalError(f"{argv[0]}: command not found (run `make setup`)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LocalError(f"{argv[0]}: timed out after {timeout} s") from exc
    done = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr or b"")
    if check and proc.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else "no error output"
        raise LocalError(f"{argv[0]} failed with exit code {proc.returncode}: {last}")
    return done
