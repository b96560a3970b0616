"""The server's verbs: `rampart serve`, `channel`, `machine`, `fleet`, `token`.

Each opens the database given by --db (default: SQLite next to the webroot),
upgrades its schema, and calls one function of rampart.server.admin.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rampart.commands.common import JSON, Arg, Group, Verb, arg, count, print_json, timeout
from rampart.contracts import wire
from rampart.errors import AuditError, LocalError, UsageError
from rampart.server import roles


def seconds(text: str) -> float:
    """A duration on the command line: a number of seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds above 0")
    return value


def _emit(payload: Any) -> None:
    print_json(payload, default=str)  # what JSON has no type for is printed as text


def _store(args: argparse.Namespace) -> Any:
    from rampart.server import db
    from rampart.server.store import Store

    webroot: Path = args.webroot
    if not webroot.is_dir():
        raise LocalError(f"{webroot}: webroot not found or not a directory")
    engine = db.make_engine(args.db or db.default_url(webroot))
    db.migrate(engine)
    return Store(engine)


def _channel_text(state: Any) -> str:
    text = f"{state.os}/{state.name}: {state.version or '(no version)'}"
    if state.default:
        text += " (default)"
    if state.rollout_version:
        text += (
            f", rollout of {state.rollout_version} at {state.rollout_percent:g} % "
            f"({state.rollout_state})"
        )
    if state.require_attestation:
        text += ", updates for attested machines only"
    return text


def _print_channel(args: argparse.Namespace, state: Any) -> int:
    if args.json:
        _emit(
            {
                "os": state.os,
                "name": state.name,
                "version": state.version,
                "default": state.default,
                "rollout_version": state.rollout_version,
                "rollout_percent": state.rollout_percent,
                "rollout_state": str(state.rollout_state),
                "require_attestation": state.require_attestation,
            }
        )
    else:
        print(_channel_text(state))
    return 0


def _tuf_options(args: argparse.Namespace) -> None:
    """Check the --tuf-* options and the keys against the webroot's repository, and pass
    them to the workers (in the environment); without --tuf-key, clear them there."""
    from rampart.server import signer

    for name in signer.ENVIRONMENT:
        os.environ.pop(name, None)
    extra = (args.tuf_password_file, args.tuf_timestamp_expiry, args.tuf_interval)
    if not args.tuf_key:
        if any(value is not None for value in extra):
            raise UsageError(
                "--tuf-password-file, --tuf-timestamp-expiry and --tuf-interval need --tuf-key"
            )
        return
    options = signer.Options(
        tuple(signer.KeySpec.parse(text) for text in args.tuf_key),
        args.tuf_password_file,
        signer.DEFAULT_TIMESTAMP_EXPIRY
        if args.tuf_timestamp_expiry is None
        else args.tuf_timestamp_expiry,
        signer.DEFAULT_INTERVAL if args.tuf_interval is None else args.tuf_interval,
    )
    options.load(args.webroot)  # the keys open and are the repository's, or one line
    os.environ.update(options.to_environment())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rampart.server import admin

    if not args.webroot.is_dir():
        raise LocalError(f"{args.webroot}: webroot not found or not a directory")
    _tuf_options(args)
    store = _store(args)
    for channel in admin.bootstrap(store, args.webroot):
        print(
            f"rampart: channel {_channel_text(channel)} created from the webroot", file=sys.stderr
        )
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit() or not host:
        raise UsageError(f"--listen {args.listen!r}: expected HOST:PORT")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    os.environ["RAMPART_WEBROOT"] = str(args.webroot.resolve())
    os.environ["RAMPART_DB"] = args.db or ""
    from rampart.server import connections

    # The workers read the limits and the TLS files from the environment; the parent
    # loads the chain once first, so a bad file is one line and exit 3, not a traceback.
    limits = connections.Limits(
        per_address=args.max_connections_per_address,
        handshake_timeout=args.tls_handshake_timeout,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
    )
    os.environ[connections.LIMITS_ENV] = limits.to_env()
    if args.tls_cert:
        connections.tls_context(str(args.tls_cert), str(args.tls_key))
        os.environ[connections.CERT_ENV] = str(args.tls_cert.resolve())
        os.environ[connections.KEY_ENV] = str(args.tls_key.resolve())
    else:
        os.environ.pop(connections.CERT_ENV, None)
        os.environ.pop(connections.KEY_ENV, None)
    if args.new_machines_per_hour < 0 or args.check_retention_days <= 0:
        raise UsageError("--new-machines-per-hour must be >= 0, --check-retention-days > 0")
    os.environ["RAMPART_NEW_MACHINES_PER_HOUR"] = str(args.new_machines_per_hour)
    os.environ["RAMPART_CHECK_RETENTION_DAYS"] = str(args.check_retention_days)

    uvicorn.run(
        "rampart.server.app:app_from_environment",
        factory=True,
        host=host.strip("[]"),
        port=int(port),
        workers=args.workers,
        http="rampart.server.connections:GuardedProtocol",  # TLS is done there too
        log_level="warning" if not args.verbose else "info",
        access_log=args.verbose,
        proxy_headers=False,
        server_header=False,
        limit_concurrency=2048,
    )
    return 0


def cmd_channel(args: argparse.Namespace) -> int:
    from rampart.server import admin, audit

    store = _store(args)
    by = audit.cli_actor()
    action = args.channel_verb
    if action == "list":
        rows = store.channel_rows()
        if args.json:
            _emit(rows)
        else:
            for state in store.channels():
                print(_channel_text(state))
        return 0
    if action == "create":
        state = admin.create_channel(
            store, args.webroot, args.os, args.name, args.version, args.default, by=by
        )
    elif action == "set":
        state = admin.set_version(
            store, args.webroot, args.os, args.name, args.version, args.force, by=by
        )
    elif action == "rollout":
        step = args.rollout_verb
        if step == "start":
            state = admin.start_rollout(
                store,
                args.webroot,
                args.os,
                args.name,
                args.version,
                args.percent,
                args.failure_threshold,
                args.min_reports,
                args.min_failing,
                by=by,
            )
        elif step == "raise":
            state = admin.raise_rollout(store, args.os, args.name, args.percent, by=by)
        elif step == "pause":
            state = admin.pause_rollout(store, args.os, args.name, by=by)
        elif step == "resume":
            state = admin.resume_rollout(store, args.os, args.name, by=by)
    if action == "attestation":
        require = args.require == "on"
        state = admin.set_attestation(store, args.os, args.name, require, by=by)
    return _print_channel(args, state)


def _key_text(state: dict[str, Any]) -> str:
    attested = f", attested {_ago(state['attested_at'])}" if state.get("attested_at") else ""
    return (
        f"{state['machine_id']}  {state['key_id'][:16]}  {state['kind']:<4} "
        f"{state['state']:<8} first seen {_ago(state['first_seen'])}{attested}"
    )


def _machine_keys(args: argparse.Namespace, store: Any) -> int:
    """machine admit|reject|keys|admission."""
    from rampart.server import admin, audit

    by = audit.cli_actor()
    verb = args.machine_verb
    if verb == "admission":
        if args.mode is not None:
            store.set_admission(args.mode, by=by)
        mode = "first-use" if store.first_use_admission() else "operator"
        if args.json:
            _emit({"admission": mode})
        else:
            print(f"admission: {mode}")
        return 0
    if verb == "keys":
        rows = store.machine_keys(args.machine_id, args.state)
        if args.json:
            _emit(rows)
        else:
            for row in rows:
                print(_key_text(row))
        return 0
    if verb == "reject":
        rejected = admin.reject(store, args.machine_id, by=by, key_id=args.key_id)
        if args.json:
            _emit({"machine_id": args.machine_id, "rejected": rejected})
        else:
            print(f"{args.machine_id}: rejected {', '.join(k[:16] for k in rejected)}")
        return 0
    return _admit(args, store, by)


def _admit(args: argparse.Namespace, store: Any, by: Any) -> int:
    from rampart.server import admin

    if args.enroll is not None:
        lines = _read_text(args.enroll).splitlines()
        admitted = admin.enroll(store, lines, str(args.enroll), by=by)
        if args.json:
            _emit([{"machine_id": m, "key_id": k} for m, k in admitted])
        else:
            for machine_id, key_id in admitted:
                print(f"{machine_id}: key {key_id[:16]} admitted")
        return 0
    if args.machine_id is None:
        raise UsageError("give MACHINE_ID (or --enroll FILE)")
    key = None
    if args.key is not None:
        key = admin.read_public_key(_read_text(args.key), str(args.key))
    key_id = admin.admit(store, args.machine_id, by=by, key_id=args.key_id, public_key=key)
    if args.json:
        _emit({"machine_id": args.machine_id, "key_id": key_id})
    else:
        print(f"{args.machine_id}: key {key_id[:16]} admitted")
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalError(f"{path}: cannot read: {exc}") from None


def cmd_machine(args: argparse.Namespace) -> int:
    from rampart.server import admin, audit

    store = _store(args)
    if args.machine_verb in ("admit", "reject", "keys", "admission"):
        return _machine_keys(args, store)
    if args.machine_verb == "assign":
        channel = None if args.default else args.channel
        if channel is None and not args.default:
            raise UsageError("give --channel C or --default")
        admin.assign(store, args.machine_id, args.os, channel, by=audit.cli_actor())
        if args.json:
            _emit({"machine_id": args.machine_id, "os": args.os, "channel": channel})
        else:
            print(f"{args.machine_id}: {'default channel' if channel is None else channel}")
        return 0
    if args.machine_verb == "show":
        row = store.machine(wire.check_machine_id(args.machine_id))
        if row is None:
            raise LocalError(f"machine {args.machine_id} has never checked in nor been assigned")
        if args.json:
            _emit(row)
        else:
            for key, value in row.items():
                print(f"{key}: {value}")
        return 0
    rows = store.machines()
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(
                f"{row['machine_id']}  {row['version'] or '-':<16} "
                f"{row['channel'] or 'default':<12} {_ago(row['last_seen'])}"
            )
    return 0


def _ago(at: float | None) -> str:
    if at is None:
        return "never seen"
    delta = time.time() - at
    if delta < 120:
        return f"{delta:.0f} s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    if delta < 172800:
        return f"{delta / 3600:.0f} h ago"
    return f"{delta / 86400:.0f} d ago"


def _proof(machine: dict[str, Any]) -> str:
    """What a machine proved, as the dashboard shows it: its key, PCR 7, epoch."""
    if machine["key"] is None:
        return "no admitted key"
    parts = [f"{machine['key']} key"]
    if machine["pcr7_good"] is None:
        parts.append("not attested")
    else:
        parts.append("PCR 7 known good" if machine["pcr7_good"] else "PCR 7 unknown")
    if machine["epoch"] is not None:
        parts.append(f"epoch {machine['epoch']}")
    if machine["attested_at"] is not None:
        parts.append(f"attested {_ago(machine['attested_at'])}")
    return ", ".join(parts)


def cmd_fleet(args: argparse.Namespace) -> int:
    from rampart.server import admin

    view = admin.fleet(_store(args), args.silent_days)
    if args.json:
        _emit(view)
        return 0
    counts = view["counts"]
    print(
        f"{view['machines']} machines, {counts.get('checks', 0)} checks, "
        f"{counts.get('reports_success', 0)} successful and "
        f"{counts.get('reports_failure', 0)} failed installs (authenticated)"
    )
    print(
        f"anonymous (counted for nothing): {counts.get('anonymous_machines', 0)} machines, "
        f"{counts.get('anonymous_checks', 0)} checks, {counts.get('anonymous_reports', 0)} reports"
    )
    print("channels:")
    for ch in view["channels"]:
        rollout = ""
        if ch["rollout_version"]:
            rollout = (
                f", rollout {ch['rollout_version']} at {ch['rollout_percent']:g} % "
                f"({ch['rollout_state']})"
            )
        default = " (default)" if ch["is_default"] else ""
        print(f"  {ch['os']}/{ch['name']}{default}: {ch['version']}{rollout}")
    print("versions per channel:")
    for row in view["versions"]:
        print(f"  {row['os']}/{row['channel']} {row['version']}: {row['machines']}")
    print(f"machines seen last (up to {admin.LAST_SEEN_LISTED}, authenticated):")
    for m in view["last_seen"]:
        print(
            f"  {m['machine_id']} {m['version']} {m['channel']} {_ago(m['last_seen'])}: {_proof(m)}"
        )
    ident = view["identity"]
    print(
        f"identity: {ident['admitted']} machines admitted, {ident['pending']} keys pending "
        f"(rampart machine keys --state pending), {ident['rejected']} rejected"
    )
    print(f"silent for more than {view['silent_days']:g} days: {view['silent_count']}")
    for m in view["silent"]:
        print(f"  {m['machine_id']} {m['version']} last seen {_ago(m['last_seen'])}")
    print(f"recent failures: {len(view['recent_failures'])}")
    for r in view["recent_failures"]:
        print(f"  {r['machine_id']} {r['from_version']} -> {r['to_version']}: {r['error']}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from rampart.server import audit

    store = _store(args)
    if args.token_verb == "list":  # noqa: S105 - a verb name, not a password
        listed = store.list_tokens()
        if args.json:
            _emit(listed)
        else:
            for row in listed:
                created = _ago(float(str(row["created_at"])))
                print(f"{row['name']!s:<32} {row['role']!s:<9} created {created}")
        return 0
    if args.token_verb == "create":  # noqa: S105 - a verb name, not a password
        token = store.create_token(args.name, args.role, by=audit.cli_actor())
        if args.json:
            _emit({"name": args.name, "role": args.role, "token": token})
        else:
            print(token)
            print(
                f"rampart: token {args.name!r} created; it is shown only now (the server "
                "keeps its SHA-256)",
                file=sys.stderr,
            )
        return 0
    store.revoke_token(args.name, by=audit.cli_actor())
    print(f"token {args.name!r} revoked")
    return 0


def cmd_attestation(args: argparse.Namespace) -> int:
    from rampart.server import admin, audit

    store = _store(args)
    by = audit.cli_actor()
    step = args.known_verb
    if step == "list":
        rows = store.known_pcr7(args.os)
        if args.json:
            _emit(rows)
        else:
            for row in rows:
                print(f"{row['os']}  {row['value']}  {row['note'] or ''}".rstrip())
        return 0
    if step == "add":
        value = admin.add_known_pcr7(store, args.os, args.value, args.note, by=by)
    elif step == "learn":
        value = admin.learn_pcr7(store, args.os, args.machine_id, by=by)
    else:
        value = admin.check_pcr7(args.value)
        store.remove_known_pcr7(args.os, value, by=by)
    if args.json:
        _emit({"os": args.os, "value": value, "known_good": step != "remove"})
    else:
        print(f"{args.os}: PCR 7 {value} {'removed' if step == 'remove' else 'known good'}")
    return 0


def _audit_text(entry: dict[str, Any]) -> str:
    from rampart.server.audit import described

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"]))
    who = f"{entry['name']} ({entry['role']}, {entry['via']}"
    who += f" from {entry['address']})" if entry.get("address") else ")"
    change = ""
    if entry.get("before") is not None or entry.get("after") is not None:
        change = f": {described(entry['before'])} -> {described(entry['after'])}"
    return f"{entry['seq']:>6} {when}Z {who} {entry['action']} {entry['target']}{change}"


def cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_verb == "log":
        return _audit_log(args)
    return _audit_verify(args)


def _audit_log(args: argparse.Namespace) -> int:
    from rampart.server import audit

    engine = _store(args).engine
    since = args.since
    if since is None:
        since = 0 if args.all else audit.since_for_newest(engine, args.limit)
    if args.json:  # JSON lines, oldest first: the export (docs/formats.md)
        for line in audit.export(engine, since):
            print(line)
    else:
        for entry in audit.newer(engine, since):
            print(_audit_text(entry))
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from rampart.server import audit

    expect = audit.parse_anchor(args.expect) if args.expect else None
    if args.file is not None:
        try:
            with args.file.open(encoding="utf-8") as lines:
                verdict = audit.verify_export(lines, str(args.file), expect)
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalError(f"{args.file}: cannot read the export: {exc}") from None
        where = str(args.file)
    else:
        if args.webroot is None:
            raise UsageError("give --webroot DIR (the server's database) or --file EXPORT")
        verdict = audit.verify(_store(args).engine, expect)
        where = "the audit trail"
    if args.json:
        _emit(verdict.as_dict())
    elif not verdict.problems:
        print(
            f"{where}: intact, {verdict.entries} entries; anchor {verdict.seq}:{verdict.hash} "
            "(keep it elsewhere; --expect checks it later)"
        )
    if verdict.problems:
        raise AuditError(f"{where}: {len(verdict.problems)} problem(s) found", verdict.problems)
    return 0


# --- the verbs ----------------------------------------------------------------------

SERVER_OPTIONS = (
    arg(
        "--webroot",
        type=Path,
        required=True,
        metavar="DIR",
        help="the static webroot (releases under dist/)",
    ),
    arg(
        "--db",
        metavar="URL",
        help="sqlite:///PATH or postgresql://USER@HOST/DB "
        "(default: sqlite in DIR.sqlite, next to the webroot)",
    ),
    arg("-v", "--verbose", action="store_true", help="log each request"),
)
ADMIN_JSON = arg("--json", action="store_true", help="print JSON on stdout")
NAME = arg("name")
OS = arg("--os", required=True)


def leaf(path: tuple[str, ...], help_text: str, *args: Arg) -> Verb:
    """An admin verb under a group: the server options, --json, then its own."""
    return Verb(path, help_text, help_text, None, (*SERVER_OPTIONS, ADMIN_JSON, *args))


VERBS: list[Group | Verb] = [
    Verb(
        ("serve",),
        "run the update server",
        "Serve the CLIP OS update protocol for WEBROOT: per-machine version checks (channels "
        "and staged rollouts), install reports, the payloads under dist/, the admin API "
        "(/admin/api, OpenAPI at /admin/openapi.json), the fleet dashboard (/admin/) and "
        "Prometheus metrics (/metrics). Channels are created from the webroot's version "
        "files the first time an OS is seen. With --tuf-key, it also holds the online keys "
        "of the webroot's TUF repository: it keeps tuf/ signed and fresh, signs each "
        "channel's head (heads/<os>/<c>.json) as the database changes, and serves both.",
        cmd_serve,
        (
            JSON,
            *SERVER_OPTIONS,
            arg(
                "--listen",
                default="127.0.0.1:8443",
                metavar="HOST:PORT",
                help="address to listen on (default 127.0.0.1:8443)",
            ),
            arg(
                "--tls-cert",
                type=Path,
                metavar="FILE",
                help="serve HTTPS with this "
                "certificate chain (clients require HTTPS; omit only behind a TLS proxy)",
            ),
            arg("--tls-key", type=Path, metavar="FILE"),
            arg("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)"),
            arg(
                "--max-connections-per-address",
                type=count,
                default=64,
                metavar="N",
                help="open connections one client address may hold per worker; more are reset "
                "(default 64, 0: no limit; behind a proxy, every connection is the proxy's)",
            ),
            arg(
                "--header-timeout",
                type=timeout,
                default=10.0,
                metavar="S",
                help="seconds a client has to send a request's headers (default 10, 0: none)",
            ),
            arg(
                "--body-timeout",
                type=timeout,
                default=30.0,
                metavar="S",
                help="seconds a client has to send a request's body after its headers (default 30)",
            ),
            arg(
                "--tls-handshake-timeout",
                type=timeout,
                default=10.0,
                metavar="S",
                help="seconds a client has to complete the TLS handshake (default 10)",
            ),
            arg(
                "--new-machines-per-hour",
                type=int,
                default=60,
                metavar="N",
                help="machine ids never seen before that one client address (IPv6: /64) may "
                "introduce per hour and worker; more get 429 (default 60, 0: no limit)",
            ),
            arg(
                "--check-retention-days",
                type=float,
                default=90.0,
                metavar="D",
                help="delete recorded checks older than this (default 90)",
            ),
            arg(
                "--tuf-key",
                action="append",
                metavar="[ROLE=]PATH",
                help="an online key of the webroot's TUF repository (tuf/): the server keeps "
                "the metadata signed and the channels role in step with the database. ROLE: "
                "snapshot, timestamp or channels; without it the key serves all three. "
                "Repeatable",
            ),
            arg(
                "--tuf-password-file",
                type=Path,
                metavar="FILE",
                help="the keys' password: the first line of FILE, mode 0600 (default: the "
                "environment's RAMPART_TUF_PASSWORD, else unencrypted keys)",
            ),
            arg(
                "--tuf-timestamp-expiry",
                type=seconds,
                metavar="S",
                help="lifetime of each timestamp signed, in seconds (default 86400); it is "
                "re-signed at half its lifetime",
            ),
            arg(
                "--tuf-interval",
                type=seconds,
                metavar="S",
                help="seconds between two signing rounds (default 60); a change to a channel "
                "is signed within about a second",
            ),
        ),
        exit_codes=True,
    ),
    Group(
        ("channel",),
        "manage update channels and staged rollouts",
        "Create channels, point them at published versions, and run staged rollouts.",
        dest="channel_verb",
        metavar="ACTION",
        func=cmd_channel,
    ),
    leaf(("channel", "list"), "list channels"),
    leaf(
        ("channel", "create"),
        "create a channel",
        NAME,
        OS,
        arg("--version", help="a version published in the webroot"),
        arg("--default", action="store_true", help="make it the default channel"),
    ),
    leaf(
        ("channel", "set"),
        "point a channel at a published version",
        NAME,
        OS,
        arg("--version", required=True),
        arg("--force", action="store_true", help="allow going back to a lower version"),
    ),
    Group(
        ("channel", "rollout"),
        "start, raise, pause or resume a staged rollout",
        None,
        dest="rollout_verb",
        metavar="STEP",
    ),
    leaf(
        ("channel", "rollout", "start"),
        "offer a newer version to a share of the machines",
        NAME,
        OS,
        arg("--version", required=True),
        arg("--percent", type=float, required=True),
        arg(
            "--failure-threshold",
            type=float,
            metavar="F",
            help="halt when more than this share of reporting machines failed (default 0.2)",
        ),
        arg(
            "--min-reports",
            type=int,
            metavar="N",
            help="reports needed before the threshold applies (default 5)",
        ),
        arg(
            "--min-failing",
            type=int,
            metavar="M",
            help="distinct failing machines needed before a halt (default 5)",
        ),
    ),
    leaf(
        ("channel", "rollout", "raise"),
        "offer it to more machines (100 completes it)",
        NAME,
        OS,
        arg("--percent", type=float, required=True),
    ),
    leaf(("channel", "rollout", "pause"), "stop offering the rollout", NAME, OS),
    leaf(("channel", "rollout", "resume"), "offer it again", NAME, OS),
    leaf(
        ("channel", "attestation"),
        "offer updates only to machines attested with a known-good PCR 7 (or to all)",
        NAME,
        OS,
        arg(
            "require",
            choices=("on", "off"),
            help="on: the others are told to keep their version",
        ),
    ),
    Group(
        ("machine",),
        "assign machines to channels, show them",
        "Assign a machine to a channel (or back to the default), show or list machines.",
        dest="machine_verb",
        metavar="ACTION",
        func=cmd_machine,
    ),
    leaf(
        ("machine", "assign"),
        "put a machine on a channel",
        arg("machine_id"),
        OS,
        arg("--channel"),
        arg("--default", action="store_true", help="back to the default channel"),
    ),
    leaf(("machine", "show"), "one machine", arg("machine_id")),
    leaf(
        ("machine", "admit"),
        "admit a machine's identity key: its checks and reports count from then on",
        arg("machine_id", nargs="?"),
        arg(
            "--key",
            type=Path,
            metavar="FILE",
            help="enroll this key (`rampart identity` on the machine: PEM, or its --json)",
        ),
        arg("--key-id", metavar="FINGERPRINT", help="the pending key to admit (`machine keys`)"),
        arg(
            "--enroll",
            type=Path,
            metavar="FILE",
            help="admit a list: JSON lines, each `rampart identity --json` of one machine",
        ),
    ),
    leaf(
        ("machine", "reject"),
        "reject a machine's key (default: its pending and admitted keys)",
        arg("machine_id"),
        arg("--key-id", metavar="FINGERPRINT"),
    ),
    leaf(
        ("machine", "keys"),
        "the keys machines presented or were enrolled with, and their state",
        arg("machine_id", nargs="?"),
        arg("--state", choices=("pending", "admitted", "rejected", "replaced")),
    ),
    leaf(
        ("machine", "admission"),
        "show or set how keys are admitted: by an operator, or on first use",
        arg(
            "mode",
            nargs="?",
            choices=("operator", "first-use"),
            help="operator (default): every key waits for `machine admit`; first-use: a "
            "machine's first key is admitted when it first signs a request",
        ),
    ),
    leaf(("machine", "list"), "every machine, most recently seen first"),
    Verb(
        ("fleet",),
        "the fleet view: versions per channel, silent machines, failures",
        "Channels and rollouts, machines per version and channel, machines silent for N "
        "days, recent failed installs.",
        cmd_fleet,
        (
            JSON,
            *SERVER_OPTIONS,
            arg("--silent-days", type=float, default=7.0, metavar="N"),
        ),
        exit_codes=True,
    ),
    Group(
        ("token",),
        "create or revoke admin API tokens",
        "Create an admin token (printed once; only its SHA-256 is stored) or revoke one.",
        dest="token_verb",
        metavar="ACTION",
        func=cmd_token,
    ),
    leaf(
        ("token", "create"),
        "a new token",
        NAME,
        arg(
            "--role",
            choices=roles.ROLES,
            default=roles.ADMIN,
            help="what it may do: auditor (read), operator (channels, rollouts, machines), "
            "admin (everything, tokens too); default admin",
        ),
    ),
    leaf(("token", "revoke"), "revoke a token", NAME),
    leaf(("token", "list"), "the tokens: name, role, when created (never the token)"),
    Group(
        ("attestation",),
        "the PCR 7 values that prove a machine booted as it should",
        "Known-good PCR 7 values, per OS: what a machine measures when it booted with "
        "Secure Boot on and the fleet's keys. A signed check whose TPM quote names one of "
        'them is attested (docs/server.md "Device identity").',
        dest="attestation_verb",
        metavar="ACTION",
        func=cmd_attestation,
    ),
    Group(
        ("attestation", "known-good"),
        "list, add, remove or learn known-good PCR 7 values",
        None,
        dest="known_verb",
        metavar="STEP",
    ),
    leaf(("attestation", "known-good", "list"), "the known-good values", arg("--os")),
    leaf(
        ("attestation", "known-good", "add"),
        "add a value (64 hex digits)",
        arg("value"),
        OS,
        arg("--note", help="what it is (e.g. the release and keys it was measured with)"),
    ),
    leaf(("attestation", "known-good", "remove"), "remove a value", arg("value"), OS),
    leaf(
        ("attestation", "known-good", "learn"),
        "add the PCR 7 a reference machine last attested",
        arg("machine_id"),
        OS,
    ),
    Group(
        ("audit",),
        "the audit trail: who changed what, and its verification",
        "Every state-changing action (channels, rollouts, machines, tokens, dashboard "
        "sessions, auto-halts) is an entry of an append-only, hash-chained log in the "
        "database: who (name, role, how, from where), what, when, before and after.",
        dest="audit_verb",
        metavar="ACTION",
        func=cmd_audit,
    ),
    leaf(
        ("audit", "log"),
        "show the audit trail (--json: JSON lines, the export)",
        arg("--limit", type=count, default=50, metavar="N", help="the newest N (default 50)"),
        arg("--since", type=count, metavar="SEQ", help="every entry after entry SEQ"),
        arg("--all", action="store_true", help="every entry"),
    ),
    Verb(
        ("audit", "verify"),
        "check the hash chain: altered, removed or reordered entries",
        "Walk the audit trail (in the database, or an export made with `audit log --json "
        "--all`) and check each entry against the one before it. Prints an anchor "
        "(SEQ:HASH) to keep elsewhere: --expect checks a later log still holds it, which "
        "finds a chain rewritten by someone who could write the database. Exit 5 with "
        "one line per problem.",
        None,
        (
            ADMIN_JSON,
            arg("--webroot", type=Path, metavar="DIR", help="the server's webroot (its database)"),
            SERVER_OPTIONS[1],
            arg("--file", type=Path, metavar="EXPORT", help="check an export instead"),
            arg("--expect", metavar="SEQ:HASH", help="an anchor printed by an earlier verify"),
        ),
    ),
]
