"""HTTP triggers of the consent link: ``GET /api/consent`` (function key) starts the sign-in,
``GET|POST /api/consent/callback`` (anonymous: the function key's ``?code=`` would collide with
OAuth's ``code``; ``state`` plus the browser's cookie protect it) finishes it.

Thin on purpose: parse the request, call ``mail2blob.consent``, render the page, set headers.
The engine (MSAL, the SDKs) is imported on first use, not when the app is indexed.

The cookie is ``SameSite=None; Secure; HttpOnly``, not ``Lax``: with ``response_mode=form_post``
Microsoft's page POSTs the answer cross-site to the callback, and browsers do not send ``Lax``
cookies on cross-site POSTs, so the flow could never be finished. CSRF is still blocked: the
callback accepts only an answer whose ``state`` matches the flow the cookie names, and the flow is
single use. The cookie holds nothing but a random flow id and lives ten minutes.
"""

from __future__ import annotations

import logging
import posixpath
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func

from mail2blob.errors import Mail2BlobError, SettingsError
from mail2blob.settings import Settings

bp = func.Blueprint()
logger = logging.getLogger(__name__)

COOKIE_NAME = "mail2blob_consent"
DEFAULT_COOKIE_PATH = "/api/consent"
MAX_FORM_BYTES = 64 * 1024


def _page(body: str, status: int, extra: dict[str, str] | None = None) -> func.HttpResponse:
    from mail2blob import consent_pages

    headers = dict(consent_pages.SECURITY_HEADERS) | (extra or {})
    return func.HttpResponse(
        body, status_code=status, headers=headers, mimetype="text/html", charset="utf-8"
    )


def _problem(title: str, message: str, status: int) -> func.HttpResponse:
    from mail2blob import consent_pages

    return _page(consent_pages.render_problem(title, message), status)


def _settings_problem(exc: SettingsError) -> func.HttpResponse:
    logger.error("consent: %s", exc)
    return _problem(
        "mail2blob is not configured",
        "The Function App's MAIL2BLOB_* settings are incomplete or invalid; its log names each "
        "one. Consent cannot run until they are fixed.",
        500,
    )


def _cookie(value: str, path: str, max_age: int) -> str:
    return f"{COOKIE_NAME}={value}; Max-Age={max_age}; Path={path}; Secure; HttpOnly; SameSite=None"


def _cookie_path(start_path: str, redirect_uri: str) -> str:
    """The narrowest path that covers the start URL and the callback (same host assumed)."""
    try:
        common = posixpath.commonpath([start_path or "/", urlsplit(redirect_uri).path or "/"])
    except ValueError:
        return "/"
    return common or "/"


def _flow_id(req: func.HttpRequest) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load(req.headers.get("cookie", ""))
    except CookieError:
        return None
    morsel = jar.get(COOKIE_NAME)
    return morsel.value if morsel and morsel.value else None


def _callback_params(req: func.HttpRequest) -> dict[str, str]:
    if req.method == "POST":
        body = req.get_body() or b""
        kind = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded" or len(body) > MAX_FORM_BYTES:
            return {}
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return {key: req.params[key] for key in req.params}


@bp.function_name("consent_start")
@bp.route(route="consent", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def consent_start(req: func.HttpRequest) -> func.HttpResponse:
    from mail2blob import consent, consent_pages

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return _settings_problem(exc)
    try:
        redirect_uri = consent.callback_uri(req.url, dict(req.headers), settings)
    except ValueError:
        return _problem("Bad request", "The request's Host header is not a host name.", 400)
    login_hint = (req.params.get("login_hint") or "").strip()[:256] or None
    source_id = (req.params.get("source") or "").strip()[:64] or None
    mailbox = (req.params.get("mailbox") or "").strip()[:256] or None
    try:
        chosen = consent.for_source(settings, source_id=source_id, mailbox=mailbox)
        started = chosen.start(redirect_uri, login_hint=login_hint or mailbox)
    except SettingsError as exc:  # unknown or ambiguous ?source= / ?mailbox=
        return _problem("Unknown mailbox", "; ".join(exc.problems), 400)
    except Mail2BlobError as exc:
        logger.error("consent could not start: %s", exc)
        return _problem("Consent is unavailable right now", f"{exc}. Try again in a minute.", 503)
    path = _cookie_path(urlsplit(req.url).path, redirect_uri)
    headers = dict(consent_pages.SECURITY_HEADERS) | {
        "Location": started.auth_uri,
        "Set-Cookie": _cookie(started.flow_id, path, consent.FLOW_TTL_S),
    }
    return func.HttpResponse(status_code=302, headers=headers)


@bp.function_name("consent_callback")
@bp.route(route="consent/callback", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def consent_callback(req: func.HttpRequest) -> func.HttpResponse:
    from mail2blob import consent, consent_pages

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return _settings_problem(exc)
    flow_id = _flow_id(req)
    try:
        source_id = consent.flow_source(settings, flow_id)
        chosen = consent.for_source(
            settings, source_id=source_id if source_id not in (None, "default") else None
        )
    except Mail2BlobError as exc:
        logger.error("consent callback: %s", exc)
        return _problem("Consent is unavailable right now", f"{exc}. Try again in a minute.", 503)
    result = chosen.finish(flow_id, _callback_params(req))
    extra = {}
    if result.outcome.consumed:
        path = posixpath.dirname(urlsplit(req.url).path.rstrip("/")) or DEFAULT_COOKIE_PATH
        extra["Set-Cookie"] = _cookie("", path, 0)
    return _page(consent_pages.render_result(result), result.status, extra)
