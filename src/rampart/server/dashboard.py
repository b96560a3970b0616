"""The fleet dashboard: one read-only HTML page, behind the admin token.

Per channel its target and rollout, a bar chart of machines per version (inline
SVG: no script, no external asset), last-seen ages, recent failures, the newest
entries of the audit trail, and who is signed in with which role. A
browser signs in by posting a token to /admin/login, which opens a session
(rampart.server.sessions) and sets an HttpOnly, SameSite=Strict cookie holding the
session's id, never the token; /admin/logout closes it. The guard
(rampart.server.guard) checks the cookie and the Origin of every request.
"""

from __future__ import annotations

import html
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from rampart.server import admin, audit, sessions
from rampart.server.guard import COOKIE, Holder, holder
from rampart.server.state import Server, require_admin

TRAIL = 20  # entries of the audit trail on the page
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2433;background:#f7f8fa}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;background:#fff;min-width:40rem}
th,td{border:1px solid #d5d9e0;padding:.35rem .6rem;text-align:left;font-size:.9rem}
th{background:#eef1f5}.bad{color:#b42318}.ok{color:#067647}.muted{color:#667085}
.card{display:inline-block;background:#fff;border:1px solid #d5d9e0;padding:.6rem 1rem;
margin-right:1rem}.card b{font-size:1.3rem;display:block}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _age(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "never"
    delta = max(0.0, now - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{delta / size:.0f} {unit} ago"
    return f"{delta:.0f} s ago"


def _chart(rows: list[dict[str, Any]]) -> str:
    """Horizontal bars: machines per (channel, version)."""
    if not rows:
        return '<p class="muted">No machine has checked in yet.</p>'
    width, bar, gap, label = 640, 22, 8, 220
    top = max(r["machines"] for r in rows) or 1
    height = len(rows) * (bar + gap) + gap
    parts = [
        f'<svg role="img" aria-label="machines per version" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, row in enumerate(rows):
        y = gap + i * (bar + gap)
        length = (width - label - 60) * row["machines"] / top
        parts.append(
            f'<text x="0" y="{y + 16}" font-size="13">{_e(row["channel"])} · '
            f"{_e(row['version'])}</text>"
            f'<rect x="{label}" y="{y}" width="{length:.1f}" height="{bar}" fill="#3b6fd8">'
            f"<title>{row['machines']} machines</title></rect>"
            f'<text x="{label + length + 6:.1f}" y="{y + 16}" font-size="13">'
            f"{row['machines']}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def render(
    view: dict[str, Any],
    now: float,
    who: Holder | None = None,
    trail: list[dict[str, Any]] | None = None,
) -> str:
    """The dashboard page for a fleet view (rampart.server.admin.fleet), signed in as
    `who`, with the newest entries of the audit trail."""
    counts = view["counts"]
    signed_in = ""
    if who is not None:
        signed_in = (
            f"<p class=muted>Signed in as <b id=who>{_e(who.name)}</b> "
            f"(<span id=role>{_e(who.role)}</span>).</p>"
        )
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width'>",
        f"<title>Rampart fleet</title><style>{_STYLE}</style></head><body>",
        "<h1>Rampart fleet</h1>",
        signed_in,
        f"<div class=card>machines<b id=machines>{view['machines']}</b></div>",
        f"<div class=card>checks<b id=checks>{counts.get('checks', 0)}</b></div>",
        f"<div class=card>successful installs<b class=ok>{counts.get('reports_success', 0)}</b>"
        "</div>",
        f"<div class=card>failed installs<b class=bad>{counts.get('reports_failure', 0)}</b></div>",
        "<div class=card>anonymous checks (not counted)"
        f"<b id=anonymous class=muted>{counts.get('anonymous_checks', 0)}</b></div>",
        "<h2>Channels</h2><table id=channels><tr><th>os</th><th>channel</th><th>target</th>"
        "<th>rollout</th></tr>",
    ]
    for ch in view["channels"]:
        rollout = "—"
        if ch["rollout_version"]:
            rollout = (
                f"{_e(ch['rollout_version'])} to {ch['rollout_percent']:g} % "
                f"({_e(ch['rollout_state'])})"
            )
        default = " <span class=muted>(default)</span>" if ch["is_default"] else ""
        out.append(
            f"<tr><td>{_e(ch['os'])}</td><td>{_e(ch['name'])}{default}</td>"
            f"<td>{_e(ch['version'])}</td><td>{rollout}</td></tr>"
        )
    out.append("</table><h2>Machines per version</h2>")
    out.append(_chart(view["versions"]))
    ident = view["identity"]
    out.append(
        "<h2>Last seen</h2>"
        f"<p class=muted><span id=admitted>{ident['admitted']}</span> machines admitted, "
        f"<span id=pending>{ident['pending']}</span> keys pending.</p>"
        "<table id=last-seen><tr><th>machine</th><th>channel</th>"
        "<th>version</th><th>last seen</th><th>authenticated</th><th>PCR 7</th>"
        "<th>epoch</th><th>last attested</th></tr>"
    )
    silent = {m["machine_id"] for m in view["silent"]}
    for m in view["last_seen"][:50]:
        cls = " class=bad" if m["machine_id"] in silent else ""
        out.append(
            f"<tr{cls}><td><code>{_e(m['machine_id'])}</code></td>"
            f"<td>{_e(m['channel'] or 'default')}</td><td>{_e(m['version'])}</td>"
            f"<td>{_age(m['last_seen'], now)}</td>{_proof_cells(m, now)}</tr>"
        )
    out.append(
        f"</table><p class=muted><span id=silent>{view['silent_count']}</span> machine(s) "
        f"silent for more than {view['silent_days']:g} days.</p>"
    )
    out.append(
        "<h2>Recent failures</h2><table id=failures><tr><th>machine</th><th>update</th>"
        "<th>error</th><th>when</th></tr>"
    )
    for r in view["recent_failures"]:
        out.append(
            f"<tr><td><code>{_e(r['machine_id'])}</code></td>"
            f"<td>{_e(r['from_version'])} → {_e(r['to_version'])}</td>"
            f"<td class=bad>{_e(r['error'])}</td><td>{_age(r['at'], now)}</td></tr>"
        )
    if not view["recent_failures"]:
        out.append("<tr><td colspan=4 class=muted>none</td></tr>")
    out.append("</table>")
    out.append(_trail(trail or [], now))
    out.append(
        "<form method=post action=/admin/logout><button id=logout>Sign out</button>"
        "</form></body></html>"
    )
    return "".join(out)


def _proof_cells(machine: dict[str, Any], now: float) -> str:
    """Authenticated (and with which key), PCR 7 known good, epoch, last attested."""
    if machine.get("authenticated"):
        who = f"<td class=ok>yes ({_e(machine['key'])} key)</td>"
    else:
        who = "<td class=muted>no</td>"
    good = machine.get("pcr7_good")
    if good is None:
        pcr7 = "<td class=muted>—</td>"
    else:
        pcr7 = "<td class=ok>known good</td>" if good else "<td class=bad>unknown</td>"
    attested = machine.get("attested_at")
    when = _age(attested, now) if attested else "never"
    return f"{who}{pcr7}<td>{_e(machine.get('epoch'))}</td><td>{when}</td>"


def _trail(entries: list[dict[str, Any]], now: float) -> str:
    """The newest entries of the audit trail (`rampart audit log` has them all)."""
    out = [
        "<h2>Audit trail</h2><table id=audit><tr><th>#</th><th>when</th><th>who</th>"
        "<th>action</th><th>target</th><th>change</th></tr>"
    ]
    for entry in entries:
        who = f"{entry['name']} ({entry['role']}, {entry['via']})"
        if entry.get("address"):
            who += f" from {entry['address']}"
        change = f"{audit.described(entry['before'])} → {audit.described(entry['after'])}"
        out.append(
            f"<tr><td>{entry['seq']}</td><td>{_age(entry['at'], now)}</td><td>{_e(who)}</td>"
            f"<td>{_e(entry['action'])}</td><td><code>{_e(entry['target'])}</code></td>"
            f"<td>{_e(change)}</td></tr>"
        )
    if not entries:
        out.append("<tr><td colspan=6 class=muted>none</td></tr>")
    out.append("</table>")
    return "".join(out)


_LOGIN = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>Rampart sign in</title>"
    f"<style>{_STYLE}</style></head><body><h1>Rampart fleet</h1>"
    "<form method=post action=/admin/login><label>Admin token "
    "<input type=password name=token autocomplete=off size=50></label> "
    "<button>Sign in</button></form>{message}</body></html>"
)


router = APIRouter()


@router.get("/admin/login", include_in_schema=False)
async def login_form() -> HTMLResponse:
    return HTMLResponse(_LOGIN.replace("{message}", ""))


@router.post("/admin/login", include_in_schema=False)
async def login(request: Request, server: Server) -> Response:
    body = await request.body()  # at most guard.MAX_FORM_BODY bytes
    token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    address = request.client.host if request.client else None
    session_id = await run_in_threadpool(
        sessions.open_session, server.store.engine, token, None, address
    )
    if session_id is None:
        page = _LOGIN.replace("{message}", "<p class=bad>Invalid token.</p>")
        return HTMLResponse(page, status_code=401)
    response = RedirectResponse("/admin/", status_code=303)
    # Secure always: browsers keep Secure cookies for http://localhost too, and
    # behind a TLS proxy the app itself sees plain HTTP.
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=True,
        path="/admin",
        max_age=int(sessions.LIFETIME),
    )
    return response


@router.post("/admin/logout", include_in_schema=False)
async def logout(request: Request, server: Server) -> Response:
    session_id = request.cookies.get(COOKIE)
    if session_id:
        address = request.client.host if request.client else None
        await run_in_threadpool(sessions.close_session, server.store.engine, session_id, address)
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(COOKIE, path="/admin", secure=True, httponly=True, samesite="strict")
    return response


@router.get("/admin/", include_in_schema=False)
async def page(request: Request, server: Server, silent_days: float = 7.0) -> Response:
    try:
        await require_admin(request)
    except HTTPException:
        return RedirectResponse("/admin/login", status_code=303)
    view = await run_in_threadpool(admin.fleet, server.store, silent_days)
    trail = await run_in_threadpool(audit.entries, server.store.engine, TRAIL)
    who = holder(request.scope)
    return HTMLResponse(render(view, time.time(), who, trail))
