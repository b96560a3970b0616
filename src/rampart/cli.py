"""The `rampart` command: parses flags, calls one function, maps errors to exit codes.

The verbs are declared in rampart.commands. Exit codes are those of rampart.errors
(docs/exit-codes.md). A user sees one line per error; `--debug` adds the traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from rampart.commands import build_parser
from rampart.errors import AuditError, LocalError, RampartError


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(words).parse_args(words)
    # The update verb logs its steps (plain lines for the journal) by default.
    verbose = getattr(args, "verbose", False) or args.verb in ("update", "install")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if verbose else logging.WARNING,
        format="rampart: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[Any], int] = args.func
    try:
        return func(args)
    except AuditError as exc:
        for problem in exc.problems:
            print(f"rampart: {problem}", file=sys.stderr)
        print(f"rampart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RampartError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"rampart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a local failure no layer below anticipated
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"rampart: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return LocalError.exit_code
    except KeyboardInterrupt:
        print("rampart: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
