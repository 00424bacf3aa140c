"""HTML pages of the identity stand-in: sign-in/consent, device login, Entra-style error page and
the ``response_mode=form_post`` auto-submit page.

Plain HTML with stable ids and names so a browser test can drive them; no external assets and no
script except the form_post auto-submit (which also has a ``<noscript>`` button, as Entra's has).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

_STYLE = (
    "body{font-family:sans-serif;max-width:36rem;margin:3rem auto;color:#1b1b1b}"
    "fieldset{border:1px solid #ccc;padding:.5rem 1rem}label{display:block;margin:.4rem 0}"
    "button{margin:.8rem .5rem 0 0;padding:.4rem 1.4rem}#error{color:#a80000}"
)


def _document(title: str, body: str, *, onload: str = "") -> str:
    onload_attr = f' onload="{escape(onload)}"' if onload else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body{onload_attr}>{body}</body></html>\n"
    )


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


def _error_paragraph(error: str | None) -> str:
    return f'<p id="error" role="alert">{escape(error)}</p>' if error else ""


def _account_choices(users: Iterable[tuple[str, str]], selected: str | None) -> str:
    """Radio buttons ``input[name=user][value=<address>]``, one per known user."""
    rows = []
    for index, (address, name) in enumerate(users):
        checked = " checked" if selected and address.lower() == selected.lower() else ""
        rows.append(
            f'<label for="user-{index}"><input type="radio" id="user-{index}" name="user" '
            f'value="{escape(address)}"{checked}> <span class="name">{escape(name)}</span> '
            f'<span class="address">{escape(address)}</span></label>'
        )
    return (
        '<fieldset id="accounts"><legend>Pick an account</legend>' + "".join(rows) + "</fieldset>"
    )


_BUTTONS = (
    '<button type="submit" id="accept" name="action" value="accept">Accept</button>'
    '<button type="submit" id="cancel" name="action" value="cancel">Cancel</button>'
)


def sign_in_page(
    *,
    action: str,
    request_id: str,
    app_name: str,
    client_id: str,
    scopes: Iterable[str],
    users: Iterable[tuple[str, str]],
    selected: str | None,
    error: str | None = None,
) -> str:
    """The account picker and consent prompt of ``/authorize`` (form ``#signin`` POSTs back)."""
    permissions = "".join(f"<li>{escape(scope)}</li>" for scope in scopes)
    body = (
        '<main><h1 id="title">Sign in to your account</h1>'
        f'<p id="app"><strong>{escape(app_name)}</strong> '
        f'(<code id="client-id">{escape(client_id)}</code>) wants to:</p>'
        f'<ul id="permissions">{permissions}</ul>'
        f"{_error_paragraph(error)}"
        f'<form id="signin" method="post" action="{escape(action)}">'
        f"{_hidden('request_id', request_id)}"
        f"{_account_choices(users, selected)}{_BUTTONS}</form></main>"
    )
    return _document("Sign in to your account", body)


def device_login_page(
    *,
    action: str,
    users: Iterable[tuple[str, str]],
    user_code: str = "",
    error: str | None = None,
) -> str:
    """``/devicelogin``: enter the code shown by the device, pick an account, Accept/Cancel."""
    body = (
        '<main><h1 id="title">Enter code</h1>'
        "<p>Enter the code displayed on your app or device.</p>"
        f"{_error_paragraph(error)}"
        f'<form id="devicelogin" method="post" action="{escape(action)}">'
        '<label for="user_code">Code <input type="text" id="user_code" name="user_code" '
        f'value="{escape(user_code)}" autocomplete="off"></label>'
        f"{_account_choices(users, None)}{_BUTTONS}</form></main>"
    )
    return _document("Enter code", body)


def message_page(title: str, message: str) -> str:
    """A plain result page (device login done or declined, signed out)."""
    body = f'<main><h1 id="title">{escape(title)}</h1><p id="message">{escape(message)}</p></main>'
    return _document(title, body)


def error_page(*, code: int, message: str, details: Mapping[str, str]) -> str:
    """Entra's "Sorry, but we're having trouble signing you in." page; no redirect happens."""
    rows = "".join(
        f"<tr><th>{escape(key)}</th><td>{escape(value)}</td></tr>" for key, value in details.items()
    )
    body = (
        '<main><h1 id="title">Sorry, but we\'re having trouble signing you in.</h1>'
        f'<p id="error"><span id="error-code">AADSTS{code}</span>: '
        f'<span id="error-message">{escape(message)}</span></p>'
        f'<table id="details">{rows}</table></main>'
    )
    return _document("Sign in to your account", body)


def form_post_page(action: str, fields: Mapping[str, str]) -> str:
    """``response_mode=form_post``: an auto-submitting form POSTing ``fields`` to ``action``."""
    inputs = "".join(_hidden(name, value) for name, value in fields.items())
    body = (
        f'<form id="hiddenform" method="POST" name="hiddenform" action="{escape(action)}">{inputs}'
        "<noscript><p>Script is disabled. Click Submit to continue.</p>"
        '<input type="submit" id="submit" value="Submit"></noscript></form>'
    )
    return _document("Working...", body, onload="document.forms[0].submit()")
