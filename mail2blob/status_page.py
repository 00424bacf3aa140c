"""The status report as an HTML page for a browser (``GET /api/status`` with ``Accept: text/html``),
and the content negotiation that picks it. Every value is escaped; the page has no script and
no external resource (its CSP allows nothing but its own inline style)."""

from __future__ import annotations

import base64
import hashlib
from html import escape
from typing import Any

TOKEN_LABELS = {
    "ok": "ok",
    "expires": "expires soon",
    "consent_needed": "consent needed",
    "credential_problem": "credential problem",
    "unknown": "unknown",
}

_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;width:100%}"
    "th,td{border:1px solid #ccc;padding:.4em .6em;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}.bad{color:#a40000;font-weight:600}.ok{color:#196c2e}"
    ".warn{color:#8a5a00;font-weight:600}small{color:#555}"
)

_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

#: Headers of every status response, JSON or HTML: never cached, nothing but the inline style.
SECURITY_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def prefers_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header ranks ``text/html`` above JSON (a browser); JSON otherwise,
    also for ``*/*`` (curl, monitoring probes)."""
    html_q = json_q = 0.0
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in ("text/html", "application/xhtml+xml"):
            html_q = max(html_q, q)
        elif media in ("application/json", "*/*", "application/*"):
            json_q = max(json_q, q)
    return html_q > json_q


def _cell(value: Any) -> str:
    return escape("" if value is None else str(value))


def _token_cell(token: dict[str, Any]) -> str:
    state = str(token.get("state", "unknown"))
    css = {"ok": "ok", "expires": "warn"}.get(state, "bad")
    parts = [f'<span class="{css}">{_cell(TOKEN_LABELS.get(state, state))}</span>']
    if token.get("aadsts"):
        parts.append(f"<br>{_cell(token['aadsts'])}")
    if token.get("account"):
        parts.append(f"<br><small>{_cell(token['account'])}</small>")
    if token.get("detail"):
        parts.append(f"<br><small>{_cell(token['detail'])}</small>")
    return "".join(parts)


def _run_cell(run: dict[str, Any] | None) -> str:
    if not run:
        return "none yet"
    css = "ok" if run.get("ok") else "bad"
    outcome = run.get("outcome") or ("ok" if run.get("ok") else "failed")
    return (
        f'<span class="{css}">{_cell(outcome)}</span> {_cell(run.get("started_at"))}<br>'
        f"<small>stored {_cell(run.get('stored'))}, already present "
        f"{_cell(run.get('already_present'))}, failed {_cell(run.get('failed'))}, "
        f"{_cell(run.get('seconds'))} s</small>"
    )


def _error_cell(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    return (
        f"<small>{_cell(error.get('at'))}</small><br>{_cell(error.get('kind'))}: "
        f"{_cell(error.get('message'))}"
    )


def render_status_html(report: dict[str, Any]) -> str:
    """The report of :func:`mail2blob.status.sources_status` as one self-contained page."""
    rows = []
    for source in report.get("sources", []):
        enabled = "" if source.get("enabled", True) else " <small>(disabled)</small>"
        rows.append(
            "<tr>"
            f"<td>{_cell(source.get('id'))}{enabled}</td>"
            f"<td>{_cell(source.get('mailbox'))}<br><small>{_cell(source.get('auth'))}, "
            f"after: {_cell(source.get('after'))}</small></td>"
            f"<td>{_token_cell(source.get('token') or {})}</td>"
            f"<td>{_run_cell(source.get('last_run'))}</td>"
            f"<td>{_cell(source.get('stored'))}</td>"
            f"<td>{_cell(source.get('backlog'))}</td>"
            f"<td>{_error_cell(source.get('last_error'))}</td>"
            "</tr>"
        )
    overall = (
        '<p class="ok">All sources are healthy.</p>'
        if report.get("ok")
        else '<p class="bad">At least one source needs attention.</p>'
    )
    problem = ""
    if report.get("error"):
        items = "".join(f"<li>{_cell(p)}</li>" for p in report.get("problems") or [])
        problem = f'<p class="bad">{_cell(report["error"])}</p><ul>{items}</ul>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mail2blob status</title><style>{_STYLE}</style></head><body>"
        f"<h1>mail2blob status</h1>{problem}{overall if not problem else ''}"
        f"<p><small>{_cell(report.get('generated_at'))}; sources from "
        f"{_cell(report.get('origin'))}</small></p>"
        "<table><thead><tr><th>Source</th><th>Mailbox</th><th>Token</th><th>Last run</th>"
        "<th>Stored</th><th>Backlog</th><th>Last error</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>"
    )
