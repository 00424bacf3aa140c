"""The consent pages: small, self-contained HTML (no script, no external assets, one inline style
allowed by its hash in the Content-Security-Policy). Every value is escaped; nothing Microsoft
sent is shown raw, and no token, code, ``state`` or secret is ever part of a page.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape

from .consent import ConsentResult, Outcome

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;"
    "color:#1b1b1b;line-height:1.45}h1{font-size:1.5rem}"
    "main[data-ok=yes] h1{color:#0b6a0b}main[data-ok=no] h1{color:#a80000}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem}dt{font-weight:600}"
    "dd{margin:0}code{background:#f3f3f3;padding:0 .2rem}#advice{border-left:4px solid #a80000;"
    "padding-left:.8rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

#: No script, no frames, no forms, no outside resources: only the page's own inline style.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)

#: Headers of every consent response (pages and the start redirect).
SECURITY_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

CONTENT_TYPE = "text/html; charset=utf-8"

#: How to start again, in the Function App.
WEB_RESTART = "open the consent link again"
#: How to start again, on the command line.
CLI_RESTART = "run `python -m mail2blob consent` again"


def _document(title: str, body: str, *, ok: bool, outcome: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{escape(title)} - mail2blob</title><style>{_STYLE}</style></head>"
        f'<body><main id="consent" data-outcome="{escape(outcome)}" '
        f'data-ok="{"yes" if ok else "no"}"><h1 id="title">{escape(title)}</h1>{body}</main>'
        "</body></html>\n"
    )


def _next_step(result: ConsentResult, restart: str) -> str:
    if result.ok:
        return "You can close this window."
    if result.outcome is Outcome.STATE_MISMATCH:
        return (
            "If you started a consent, finish it in the browser where you started it, or "
            f"{restart}."
        )
    if result.outcome is Outcome.LOGIN_REFUSED:
        return (
            f"Fix the cause above, then {restart} and sign in with {result.mailbox} or an "
            "account with Full Access to it."
        )
    return f"To try again, {restart}."


def render_result(result: ConsentResult, *, restart: str = WEB_RESTART) -> str:
    """The page for any consent outcome."""
    parts = [f'<p id="message">{escape(result.detail)}</p>']
    if result.advice:
        code = f'<strong id="aadsts">{escape(result.aadsts)}</strong> ' if result.aadsts else ""
        parts.append(f'<p id="advice">{code}<span>{escape(result.advice)}</span></p>')
    facts = [("mailbox", "Mailbox", result.mailbox)]
    if result.account:
        facts.append(("account", "Signed in as", result.account))
    if result.next_drain:
        facts.append(("next-drain", "Next drain", result.next_drain))
    rows = "".join(
        f'<dt>{escape(label)}</dt><dd id="{key}">{escape(value)}</dd>'
        for key, label, value in facts
    )
    parts.append(f'<dl id="facts">{rows}</dl>')
    parts.append(f'<p id="next-step">{escape(_next_step(result, restart))}</p>')
    return _document(result.title, "".join(parts), ok=result.ok, outcome=result.outcome.key)


def render_problem(title: str, message: str, *, outcome: str = "problem") -> str:
    """A page for failures outside a consent result (settings, a bad request)."""
    body = f'<p id="message">{escape(message)}</p>'
    return _document(title, body, ok=False, outcome=outcome)


def render_waiting() -> str:
    """The command line listener's answer to a request that is not Microsoft's answer."""
    return render_problem(
        "Waiting for the sign-in",
        "This address receives Microsoft's answer after you sign in. Nothing to do here.",
        outcome="waiting",
    )
