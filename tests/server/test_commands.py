"""The administration verbs: channel, machine, fleet, token (CLI, SQLite next to the webroot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rampart.server import db
from rampart.server.store import Store
from tests.conftest import run_cli
from tests.server.conftest import OS


def cli(webroot: Path, *argv: str) -> tuple[int, str, str]:
    result = run_cli(*argv, "--webroot", str(webroot))
    return result.code, result.out, result.err


def js(webroot: Path, *argv: str) -> Any:
    """The parsed --json output of a command that must succeed."""
    code, out, err = cli(webroot, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_channels_start_from_the_static_webroot(webroot: Path) -> None:
    rows = js(webroot, "channel", "list")
    assert rows == []  # nothing until the server starts
    code, _, _ = cli(webroot, "serve", "--listen", "bad")  # bootstraps, then refuses --listen
    assert code == 2
    channels = js(webroot, "channel", "list")
    assert [(c["name"], c["version"], c["is_default"]) for c in channels] == [
        ("stable", "1.0.0", True)
    ]
    assert (webroot.parent / "webroot.sqlite").exists()


def test_channel_lifecycle(webroot: Path) -> None:
    js(webroot, "channel", "create", "stable", "--os", OS, "--version", "1.0.0")
    beta = js(webroot, "channel", "create", "beta", "--os", OS, "--version", "1.0.1")
    assert beta == {
        "os": OS,
        "name": "beta",
        "version": "1.0.1",
        "default": False,
        "rollout_version": None,
        "rollout_percent": 0.0,
        "rollout_state": "none",
        "require_attestation": False,
    }
    state = js(
        webroot,
        "channel",
        "rollout",
        "start",
        "stable",
        "--os",
        OS,
        "--version",
        "1.0.2",
        "--percent",
        "10",
    )
    assert state["rollout_state"] == "active"
    assert (
        js(webroot, "channel", "rollout", "raise", "stable", "--os", OS, "--percent", "50")[
            "rollout_percent"
        ]
        == 50
    )
    assert (
        js(webroot, "channel", "rollout", "pause", "stable", "--os", OS)["rollout_state"]
        == "paused"
    )
    assert (
        js(webroot, "channel", "rollout", "resume", "stable", "--os", OS)["rollout_state"]
        == "active"
    )
    done = js(webroot, "channel", "rollout", "raise", "stable", "--os", OS, "--percent", "100")
    assert (done["version"], done["rollout_version"]) == ("1.0.2", None)
    code, out, _ = cli(webroot, "channel", "list")
    assert code == 0 and "clipos/stable: 1.0.2 (default)" in out


@pytest.mark.parametrize(
    ("argv", "code", "reason"),
    [
        (("channel", "set", "stable", "--os", OS, "--version", "9.9.9"), 2, "not in the webroot"),
        (("channel", "set", "nope", "--os", OS, "--version", "1.0.1"), 2, "unknown channel"),
        (("channel", "set", "stable", "--os", OS, "--version", "1.0"), 2, "semantic version"),
        (("channel", "create", "Bad Name", "--os", OS), 2, "channel name"),
        (("channel", "create", "stable", "--os", OS), 4, "already exists"),
        (
            (
                "channel",
                "rollout",
                "start",
                "stable",
                "--os",
                OS,
                "--version",
                "1.0.0",
                "--percent",
                "5",
            ),
            4,
            "must be newer",
        ),
        (
            (
                "channel",
                "rollout",
                "start",
                "stable",
                "--os",
                OS,
                "--version",
                "1.0.1",
                "--percent",
                "150",
            ),
            2,
            "between 0 and 100",
        ),
        (
            ("channel", "rollout", "raise", "stable", "--os", OS, "--percent", "5"),
            4,
            "no rollout in progress",
        ),
        (("machine", "assign", "zz", "--os", OS, "--channel", "stable"), 2, "32 lowercase hex"),
        (("machine", "assign", "a" * 32, "--os", OS, "--channel", "nope"), 2, "unknown channel"),
        (("token", "revoke", "nope"), 2, "no token named"),
    ],
)
def test_bad_administration_is_refused_with_one_line(
    webroot: Path, argv: tuple[str, ...], code: int, reason: str
) -> None:
    js(webroot, "channel", "create", "stable", "--os", OS, "--version", "1.0.1")
    before = js(webroot, "channel", "list")
    got, _, err = cli(webroot, *argv)
    assert got == code, err
    assert reason in err and len(err.strip().splitlines()) == 1
    assert js(webroot, "channel", "list") == before


def test_channel_never_goes_back_without_force(webroot: Path) -> None:
    js(webroot, "channel", "create", "stable", "--os", OS, "--version", "1.0.2")
    code, _, err = cli(webroot, "channel", "set", "stable", "--os", OS, "--version", "1.0.1")
    assert code == 4 and "--force" in err
    assert (
        js(webroot, "channel", "set", "stable", "--os", OS, "--version", "1.0.1", "--force")[
            "version"
        ]
        == "1.0.1"
    )


def test_tokens_are_shown_once_and_stored_hashed(webroot: Path) -> None:
    created = js(webroot, "token", "create", "ops")
    token = created["token"]
    assert token.startswith("rpt_") and len(token) > 40
    store = Store(db.make_engine(db.default_url(webroot)))
    assert token not in store.token_digests()
    code, _, err = cli(webroot, "token", "create", "ops")
    assert code == 4 and "already exists" in err
    assert cli(webroot, "token", "revoke", "ops")[0] == 0
    assert store.token_digests() == []


def test_machine_assign_show_and_fleet(webroot: Path) -> None:
    js(webroot, "channel", "create", "stable", "--os", OS, "--version", "1.0.0")
    js(webroot, "channel", "create", "beta", "--os", OS, "--version", "1.0.1")
    mid = "c" * 32
    js(webroot, "machine", "assign", mid, "--os", OS, "--channel", "beta")
    assert js(webroot, "machine", "show", mid)["channel"] == "beta"
    js(webroot, "machine", "assign", mid, "--os", OS, "--default")
    assert js(webroot, "machine", "show", mid)["channel"] is None
    view = js(webroot, "fleet", "--silent-days", "3")
    # assigned, never signed a check: it does not count (yet)
    assert view["machines"] == 0 and view["silent_days"] == 3
    assert view["counts"]["anonymous_machines"] == 1
    code, out, _ = cli(webroot, "fleet")
    assert code == 0 and "clipos/beta: 1.0.1" in out


def test_unsupported_database_url(webroot: Path) -> None:
    result = run_cli("channel", "list", "--webroot", str(webroot), "--db", "mysql://x/y")
    assert result.code == 2 and "unsupported database URL" in result.err
