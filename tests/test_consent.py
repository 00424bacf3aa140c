"""The consent link against the local stack: the HTTP functions (called as the Functions host
would, with real ``azure.functions.HttpRequest`` objects), the engine behind them, and every attack
the issue lists. The identity stand-in plays Microsoft; Dovecot checks the tokens for real."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import runpy
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import azure.functions as func
import msal
import pytest

from mail2blob import aadsts, clients, consent_pages
from mail2blob.blob_destination import STATE_PREFIX
from mail2blob.consent import (
    FLOW_PREFIX,
    FLOW_TTL_S,
    BlobFlowStore,
    Consent,
    MemoryFlowStore,
    Outcome,
    describe_next_drain,
    next_fire_time,
    parse_ncrontab,
)
from mail2blob.drain import drain_mailbox
from mail2blob.settings import Settings
from tests.stack import constants as c
from tests.stack.dovecot import free_port

ROOT = Path(__file__).resolve().parents[1]
HOST = "mail2blob.example"
CALLBACK = f"https://{HOST}/api/consent/callback"
SECRET_NAME = "mail2blob-token-cache"
FUNCTION_KEY = "the-function-key"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def functions() -> dict[str, Any]:
    """The user functions of a freshly executed ``function_app.py`` (``get_functions()`` may be
    called only once per app object, and other modules index the shared one)."""
    app = runpy.run_path(str(ROOT / "function_app.py"))["app"]
    return {f.get_function_name(): f for f in app.get_functions()}


@pytest.fixture
def env(stack, monkeypatch) -> dict[str, str]:
    return consent_env(stack, monkeypatch)


def consent_env(stack, monkeypatch) -> dict[str, str]:
    """The stack's settings in the environment, stand-ins reset, an empty vault (nobody has
    consented), a new archive container and the web redirect URI registered. Like ``fresh``
    without its consent. Shared by the consent test modules."""
    stack.identity.reset()
    stack.keyvault.reset()
    values = stack.env(container=stack.azurite.fresh_container("consent"))
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    stack.identity.add_redirect_uri(c.CLIENT_ID, CALLBACK)
    return values


def set_env(monkeypatch, env: dict[str, str], **changes: str | None) -> dict[str, str]:
    new = dict(env)
    for key, value in changes.items():
        name = "MAIL2BLOB_" + key.upper()
        if value is None:
            new.pop(name, None)
            monkeypatch.delenv(name, raising=False)
        else:
            new[name] = value
            monkeypatch.setenv(name, value)
    return new


def call(functions, name: str, req: func.HttpRequest) -> func.HttpResponse:
    return functions[name].get_user_function()(req)


def start(functions, *, host: str = HOST, headers: dict[str, str] | None = None, **params: str):
    query = {"code": FUNCTION_KEY, **params}
    req = func.HttpRequest(
        "GET",
        f"https://{host}/api/consent?{urlencode(query)}",
        headers={"host": host, **(headers or {})},
        params=query,
        body=b"",
    )
    return call(functions, "consent_start", req)


def cookie_of(response: func.HttpResponse) -> tuple[str, dict[str, str]]:
    """The flow id and the attributes of the consent cookie."""
    raw = response.headers["Set-Cookie"]
    first, *attributes = [part.strip() for part in raw.split(";")]
    name, _, value = first.partition("=")
    assert name == "mail2blob_consent"
    attrs = {}
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        attrs[key.lower()] = val
    return value, attrs


def begin(functions, **params: str) -> tuple[str, str]:
    """Start a consent: (flow id from the cookie, authorize URL)."""
    response = start(functions, **params)
    assert response.status_code == 302, response.get_body()
    flow_id, _ = cookie_of(response)
    return flow_id, response.headers["Location"]


def sign_in(stack, authorize_url: str, user: str | None = c.MAILBOX) -> dict[str, str]:
    """Play the browser at the identity stand-in: approve as ``user`` (``None``: refuse) and
    return the fields of the form_post page that would be POSTed to the callback."""
    action, fields = stack.sign_in(authorize_url, user)
    assert action == CALLBACK
    return fields


def callback(
    functions, params: dict[str, str], flow_id: str | None, *, method: str = "POST"
) -> func.HttpResponse:
    headers = {"host": HOST}
    if flow_id is not None:
        headers["cookie"] = f"other=1; mail2blob_consent={flow_id}"
    if method == "POST":
        headers["content-type"] = "application/x-www-form-urlencoded"
        req = func.HttpRequest(
            "POST", CALLBACK, headers=headers, params={}, body=urlencode(params).encode()
        )
    else:
        req = func.HttpRequest(
            "GET", f"{CALLBACK}?{urlencode(params)}", headers=headers, params=params, body=b""
        )
    return call(functions, "consent_callback", req)


def page(response: func.HttpResponse) -> str:
    return response.get_body().decode("utf-8")


def outcome(response: func.HttpResponse) -> str:
    match = re.search(r'data-outcome="([a-z_]+)"', page(response))
    assert match, page(response)
    return match.group(1)


def text_of(response: func.HttpResponse, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">(.*?)</', page(response), re.S)
    return html.unescape(match.group(1)) if match else ""


def stored_cache(stack) -> str | None:
    return stack.keyvault.value(SECRET_NAME)


def cache_account(serialized: str) -> str:
    cache = msal.SerializableTokenCache()
    cache.deserialize(serialized)
    accounts = list(cache.search(msal.TokenCache.CredentialType.ACCOUNT))
    return accounts[0]["username"]


def flow_blobs(env: dict[str, str]) -> list[str]:
    container = clients.container_client(Settings.from_env(env))
    return [b.name for b in container.list_blobs(name_starts_with=FLOW_PREFIX)]


def assert_security_headers(response: func.HttpResponse) -> None:
    headers = response.headers
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src" not in csp and "unsafe-inline" not in csp


def consent_for(env: dict[str, str], **kwargs: Any) -> Consent:
    settings = Settings.from_env(env)
    flows = kwargs.pop("flows", None) or BlobFlowStore(clients.container_client(settings))
    return Consent(settings, flows, clients.token_store(settings), **kwargs)


# ---------------------------------------------------------------------------- indexing


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def binding(functions, name: str) -> dict[str, Any]:
    raw = functions[name].get_bindings()[0].get_dict_repr()
    return {k: _plain(v) for k, v in raw.items()}


def test_functions_are_registered_with_the_right_auth_levels(functions):
    start_binding = binding(functions, "consent_start")
    assert start_binding["type"] == "httpTrigger"
    assert start_binding["route"] == "consent"
    assert start_binding["methods"] == ["GET"]
    assert start_binding["authLevel"].upper() == "FUNCTION"
    cb = binding(functions, "consent_callback")
    assert cb["route"] == "consent/callback"
    assert sorted(cb["methods"]) == ["GET", "POST"]
    # The function key travels as ?code=, which would collide with OAuth's code.
    assert cb["authLevel"].upper() == "ANONYMOUS"
    assert "drain_timer" in functions


# ---------------------------------------------------------------------------- start


def test_start_redirects_to_sign_in_with_pkce_form_post_and_a_bound_cookie(stack, env, functions):
    response = start(functions, login_hint=c.MAILBOX)
    assert response.status_code == 302
    assert_security_headers(response)
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == (
        f"{stack.identity.authority}/oauth2/v2.0/authorize"
    )
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert query["response_mode"] == "form_post"
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) >= 43
    assert query["state"] and query["nonce"]
    assert query["redirect_uri"] == CALLBACK
    assert query["prompt"] == "select_account"
    assert query["login_hint"] == c.MAILBOX
    assert c.IMAP_SCOPE in query["scope"].split() and "offline_access" in query["scope"]
    assert FUNCTION_KEY not in response.headers["Location"]

    flow_id, attrs = cookie_of(response)
    assert len(flow_id) >= 40
    assert attrs["path"] == "/api/consent"
    assert attrs["max-age"] == str(FLOW_TTL_S)
    assert {"secure", "httponly"} <= attrs.keys()
    # form_post is a cross-site POST: a SameSite=Lax cookie would not come back with it.
    assert attrs["samesite"] == "None"

    # The flow waits server-side under a digest of the cookie value, never the value itself.
    names = flow_blobs(env)
    assert names == [f"{FLOW_PREFIX}{hashlib.sha256(flow_id.encode()).hexdigest()}.json"]
    assert names[0].startswith(STATE_PREFIX)
    assert all(flow_id not in name for name in names)
    container = clients.container_client(Settings.from_env(env))
    record = json.loads(container.download_blob(names[0]).readall())
    assert record["flow"]["state"] == query["state"]
    assert record["expires_at"] - record["created_at"] == FLOW_TTL_S


def test_redirect_uri_comes_from_forwarded_host_or_the_setting(stack, env, functions, monkeypatch):
    proxied = start(functions, headers={"x-forwarded-host": "mail.contoso.example, other"})
    query = parse_qs(urlsplit(proxied.headers["Location"]).query)
    assert query["redirect_uri"] == ["https://mail.contoso.example/api/consent/callback"]

    forged = start(functions, headers={"x-forwarded-host": "evil.example/x?y=<b>"})
    assert forged.status_code == 400

    set_env(monkeypatch, env, redirect_uri="https://consent.contoso.example/api/consent/callback")
    pinned = start(functions)
    query = parse_qs(urlsplit(pinned.headers["Location"]).query)
    assert query["redirect_uri"] == ["https://consent.contoso.example/api/consent/callback"]

    set_env(monkeypatch, env, redirect_uri=None)
    bad = start(functions, host="evil.example/<script>")
    assert bad.status_code == 400
    assert "<script>" not in page(bad)


def test_start_without_settings_shows_a_page_without_details(stack, env, functions, monkeypatch):
    set_env(monkeypatch, env, mailbox=None)
    response = start(functions)
    assert response.status_code == 500
    assert_security_headers(response)
    assert "not configured" in page(response)
    assert c.CLIENT_SECRET not in page(response)


def test_start_when_the_identity_platform_is_unreachable(stack, env, functions):
    stack.identity.fail_next(5, 503, path_contains="openid-configuration")
    response = start(functions)
    assert response.status_code == 503
    assert_security_headers(response)
    assert "Set-Cookie" not in response.headers
    assert "discovery document is unavailable" in text_of(response, "message")
    assert flow_blobs(env) == []


# ---------------------------------------------------------------------------- happy paths


def test_consent_saves_a_token_proven_against_the_mailbox(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize, c.MAILBOX)
    assert set(fields) >= {"code", "state"}
    response = callback(functions, fields, flow_id)

    assert response.status_code == 200, page(response)
    assert outcome(response) == "saved"
    assert_security_headers(response)
    assert text_of(response, "mailbox") == c.MAILBOX
    assert text_of(response, "account") == c.MAILBOX
    assert "The next scheduled drain runs at" in text_of(response, "next-drain")
    assert "0 */5 * * * *" in text_of(response, "next-drain")
    cleared, attrs = cookie_of(response)
    assert cleared == "" and attrs["max-age"] == "0" and attrs["path"] == "/api/consent"

    serialized = stored_cache(stack)
    assert serialized and cache_account(serialized) == c.MAILBOX
    assert len(stack.keyvault.versions(SECRET_NAME)) == 1
    assert flow_blobs(env) == []  # single use: the flow is gone
    # The token really was proven: a login with it reached Dovecot before it was stored.
    assert stack.identity.count("authorization_code") == 1

    # And the drain runs on what consent stored.
    stack.dovecot.delete_all()
    stack.dovecot.append(b"Subject: hi\r\nFrom: a@b.example\r\n\r\nhello\r\n")
    result = drain_mailbox(Settings.from_env(env))
    assert result.ok and result.stored == 1


def test_query_mode_get_callback_also_works(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize)
    response = callback(functions, fields, flow_id, method="GET")
    assert outcome(response) == "saved"


def test_federated_credential_without_any_secret(stack, env, functions, monkeypatch):
    set_env(monkeypatch, env, client_secret=None, fic_client_id=c.MI_CLIENT_ID)
    flow_id, authorize = begin(functions)
    response = callback(functions, sign_in(stack, authorize), flow_id)
    assert outcome(response) == "saved", page(response)
    assert any(r.path == "/msi/token" for r in stack.identity.requests)
    assert cache_account(stored_cache(stack)) == c.MAILBOX


def test_delegate_consents_for_a_shared_mailbox(stack, env, functions, monkeypatch):
    set_env(monkeypatch, env, mailbox=c.SHARED_MAILBOX)
    flow_id, authorize = begin(functions)
    response = callback(functions, sign_in(stack, authorize, c.MAILBOX), flow_id)
    assert outcome(response) == "saved", page(response)
    assert text_of(response, "mailbox") == c.SHARED_MAILBOX
    assert text_of(response, "account") == c.MAILBOX


def test_consent_link_for_one_mailbox_of_many_stores_that_sources_secret(stack, env, functions):
    """``?mailbox=`` picks the delegated source from .mail2blob/sources.json; the token lands in
    that source's own secret and nowhere else."""
    import json

    from mail2blob import clients
    from mail2blob.sources import SOURCES_BLOB

    sources = {
        "sources": [
            {"id": "archive", "mailbox": c.MAILBOX, "token_secret": "token-archive"},
            {"id": "shared", "mailbox": c.SHARED_MAILBOX, "token_secret": "token-shared"},
        ]
    }
    container = clients.container_client(Settings.from_env(env))
    container.upload_blob(SOURCES_BLOB, json.dumps(sources), overwrite=True)

    flow_id, authorize = begin(functions, mailbox=c.SHARED_MAILBOX)
    response = callback(functions, sign_in(stack, authorize, c.MAILBOX), flow_id)

    assert outcome(response) == "saved", page(response)
    assert text_of(response, "mailbox") == c.SHARED_MAILBOX
    assert stack.keyvault.versions("token-shared") and not stack.keyvault.versions("token-archive")
    assert stored_cache(stack) is None  # the settings' own secret is untouched

    unknown = start(functions, mailbox="nobody@contoso.example")
    assert unknown.status_code == 400 and "no delegated source" in page(unknown)


# ---------------------------------------------------------------------------- refused


def test_wrong_account_is_refused_by_imap_and_nothing_is_stored(stack, env, functions):
    flow_id, authorize = begin(functions)
    response = callback(functions, sign_in(stack, authorize, c.OTHER_USER), flow_id)
    assert response.status_code == 403
    assert outcome(response) == "login_refused"
    message = text_of(response, "message")
    assert c.OTHER_USER in message and c.MAILBOX in message
    assert "IMAP is disabled for the mailbox" in message
    assert "Full Access" in message
    assert text_of(response, "account") == c.OTHER_USER
    assert stored_cache(stack) is None
    assert flow_blobs(env) == []


def test_no_rights_on_a_shared_mailbox_names_both_accounts(stack, env, functions, monkeypatch):
    set_env(monkeypatch, env, mailbox=c.SHARED_MAILBOX)
    flow_id, authorize = begin(functions)
    response = callback(functions, sign_in(stack, authorize, c.OTHER_USER), flow_id)
    assert outcome(response) == "login_refused"
    message = text_of(response, "message")
    assert f"{c.OTHER_USER} has no Full Access permission on {c.SHARED_MAILBOX}" in message
    assert stored_cache(stack) is None


def test_refusal_on_the_sign_in_page_explains_the_aadsts_code(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize, None)
    assert fields["error"] == "access_denied"
    response = callback(functions, fields, flow_id)
    assert response.status_code == 400
    assert outcome(response) == "denied"
    assert text_of(response, "aadsts") == "AADSTS65004"
    assert aadsts.ADVICE["AADSTS65004"].meaning in page(response)
    assert stored_cache(stack) is None
    assert stack.identity.count("authorization_code") == 0


def test_imap_unreachable_stores_nothing(stack, env, functions, monkeypatch):
    set_env(monkeypatch, env, imap_port=str(free_port()))
    flow_id, authorize = begin(functions)
    response = callback(functions, sign_in(stack, authorize), flow_id)
    assert response.status_code == 502
    assert outcome(response) == "imap_failed"
    assert "cannot connect to IMAP server" in text_of(response, "message")
    assert stored_cache(stack) is None


def test_wrong_client_secret_shows_the_advice(stack, env, functions, monkeypatch):
    set_env(monkeypatch, env, client_secret="the-secret-id-not-its-value")
    flow_id, authorize = begin(functions)
    response = callback(functions, sign_in(stack, authorize), flow_id)
    assert outcome(response) == "token_failed"
    assert text_of(response, "aadsts") == "AADSTS7000215"
    assert "the secret&#x27;s value" in page(response) or "the secret's value" in page(response)
    assert "the-secret-id-not-its-value" not in page(response)
    assert stored_cache(stack) is None


def test_key_vault_failure_is_reported_and_the_flow_is_spent(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize)
    stack.keyvault.fail_next(1, status=403, retry_after=None, method="PUT")
    response = callback(functions, fields, flow_id)
    assert response.status_code == 500
    assert outcome(response) == "store_failed"
    assert stored_cache(stack) is None
    assert outcome(callback(functions, fields, flow_id)) == "unknown_flow"


def test_a_token_response_without_refresh_token_is_not_stored(stack, env):
    engine = consent_for(env)
    result = engine.complete(
        {"access_token": "x", "expires_in": 3600, "id_token_claims": {"preferred_username": "u"}},
        msal.SerializableTokenCache(),
    )
    assert result.outcome is Outcome.NO_REFRESH_TOKEN
    assert result.aadsts == "AADSTS900144" and "offline_access" in result.advice
    assert stored_cache(stack) is None


# ---------------------------------------------------------------------------- attacks


def test_forged_state_is_rejected_and_does_not_cancel_the_real_flow(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize)
    forged = dict(fields, state="forged-" + fields["state"][7:])
    response = callback(functions, forged, flow_id)
    assert response.status_code == 400
    assert outcome(response) == "state_mismatch"
    assert "Set-Cookie" not in response.headers  # the real flow goes on
    assert stored_cache(stack) is None
    assert stack.identity.count("authorization_code") == 0
    missing = {k: v for k, v in fields.items() if k != "state"}
    assert outcome(callback(functions, missing, flow_id)) == "state_mismatch"

    assert outcome(callback(functions, fields, flow_id)) == "saved"


def test_replayed_callback_loses_and_the_code_is_not_redeemed_twice(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize)
    assert outcome(callback(functions, fields, flow_id)) == "saved"
    versions = stack.keyvault.versions(SECRET_NAME)

    for method in ("POST", "GET"):
        replay = callback(functions, fields, flow_id, method=method)
        assert replay.status_code == 400
        assert outcome(replay) == "unknown_flow"
    assert stack.identity.count("authorization_code") == 1
    assert stack.keyvault.versions(SECRET_NAME) == versions


def test_state_from_another_browser_is_rejected(stack, env, functions):
    flow_a, authorize_a = begin(functions)
    flow_b, _ = begin(functions)
    fields_a = sign_in(stack, authorize_a)
    # Browser B posts A's answer (login CSRF, or a stolen callback): B's cookie, A's state.
    response = callback(functions, fields_a, flow_b)
    assert outcome(response) == "state_mismatch"
    assert stored_cache(stack) is None
    assert stack.identity.count("authorization_code") == 0
    assert outcome(callback(functions, fields_a, flow_a)) == "saved"


def test_callback_without_a_started_flow(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize)
    no_cookie = callback(functions, fields, None)
    assert no_cookie.status_code == 400 and outcome(no_cookie) == "no_flow"
    unknown = callback(functions, fields, "A" * 43)
    assert unknown.status_code == 400 and outcome(unknown) == "unknown_flow"
    empty = callback(functions, {}, None, method="GET")
    assert empty.status_code == 400
    assert_security_headers(empty)
    wrong_type = func.HttpRequest(
        "POST",
        CALLBACK,
        headers={"content-type": "application/json", "cookie": f"mail2blob_consent={flow_id}"},
        body=json.dumps(fields).encode(),
    )
    assert outcome(call(functions, "consent_callback", wrong_type)) == "state_mismatch"
    assert stored_cache(stack) is None
    assert stack.identity.count("authorization_code") == 0


def test_error_description_is_never_reflected(stack, env, functions):
    flow_id, authorize = begin(functions)
    fields = sign_in(stack, authorize)
    attack = {
        "state": fields["state"],
        "error": "<img src=x onerror=alert(1)>",
        "error_description": "AADSTS50011: <script>alert('pwned')</script> redirect mismatch",
    }
    response = callback(functions, attack, flow_id)
    body = page(response)
    assert outcome(response) == "denied"
    assert "<script" not in body and "alert(" not in body and "onerror" not in body
    assert "pwned" not in body and "redirect mismatch" not in body
    assert text_of(response, "aadsts") == "AADSTS50011"
    assert aadsts.ADVICE["AADSTS50011"].action in html.unescape(body)
    assert "error unknown" in html.unescape(body)
    assert stored_cache(stack) is None


def test_two_racing_callbacks_redeem_the_code_once(stack, env):
    """Both callbacks load the flow before either consumes it: the conditional delete lets
    exactly one through to the token endpoint."""
    settings = Settings.from_env(env)
    inner = BlobFlowStore(clients.container_client(settings))
    barrier = threading.Barrier(2, timeout=10)

    class LockstepStore:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def load(self, flow_id: str):
            stored = inner.load(flow_id)
            barrier.wait()
            return stored

    engine = consent_for(env, flows=LockstepStore())
    started = consent_for(env).start(CALLBACK)
    fields = sign_in(stack, started.auth_uri)
    results: list[Outcome] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(engine.finish(started.flow_id, fields).outcome)
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(r.key for r in results) == ["saved", "unknown_flow"]
    assert stack.identity.count("authorization_code") == 1
    assert len(stack.keyvault.versions(SECRET_NAME)) == 1


def test_expired_flow_is_refused_and_removed(stack, env):
    now = [datetime.now(UTC).timestamp()]
    engine = consent_for(env, clock=lambda: now[0])
    started = engine.start(CALLBACK)
    fields = sign_in(stack, started.auth_uri)
    now[0] += FLOW_TTL_S + 1
    result = engine.finish(started.flow_id, fields)
    assert result.outcome is Outcome.EXPIRED
    assert flow_blobs(env) == []
    assert stack.identity.count("authorization_code") == 0
    assert stored_cache(stack) is None


def test_start_sweeps_abandoned_flows(stack, env):
    now = [datetime.now(UTC).timestamp()]
    engine = consent_for(env, clock=lambda: now[0])
    engine.start(CALLBACK)
    engine.start(CALLBACK)
    assert len(flow_blobs(env)) == 2
    now[0] += FLOW_TTL_S + 1
    engine.start(CALLBACK)
    assert len(flow_blobs(env)) == 1


def test_a_code_redeemed_elsewhere_is_explained(stack, env):
    """If the flow store failed to stop a replay, Microsoft's AADSTS54005 still ends it."""

    class NeverConsumes(MemoryFlowStore):
        def consume(self, stored) -> bool:
            return True

    engine = consent_for(env, flows=NeverConsumes())
    started = engine.start(CALLBACK)
    fields = sign_in(stack, started.auth_uri)
    assert engine.finish(started.flow_id, fields).ok
    again = engine.finish(started.flow_id, fields)
    assert again.outcome is Outcome.TOKEN_FAILED
    assert again.aadsts == "AADSTS54005"
    assert "already redeemed" in again.advice


def test_the_pkce_verifier_kept_server_side_is_what_redeems_the_code(stack, env):
    engine = consent_for(env)
    started = engine.start(CALLBACK)
    fields = sign_in(stack, started.auth_uri)
    container = clients.container_client(Settings.from_env(env))
    name = BlobFlowStore.blob_name(started.flow_id)
    record = json.loads(container.download_blob(name).readall())
    record["flow"]["code_verifier"] = "x" * 64  # not the verifier of the challenge sent
    container.upload_blob(name, json.dumps(record).encode(), overwrite=True)
    result = engine.finish(started.flow_id, fields)
    assert result.outcome is Outcome.TOKEN_FAILED
    assert result.aadsts == "AADSTS501481"
    assert stored_cache(stack) is None


def test_memory_flow_store_consumes_once():
    store = MemoryFlowStore()
    store.put("id-1", {"expires_at": 10, "flow": {}})
    first, second = store.load("id-1"), store.load("id-1")
    assert first and second
    assert store.consume(first) is True
    assert store.consume(second) is False
    assert store.load("id-1") is None


# ---------------------------------------------------------------------------- no leaks


def test_no_code_state_token_or_secret_in_logs_or_pages(stack, env, functions, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("msal", "azure", "urllib3", "imapclient", "mail2blob", "functions"):
        caplog.set_level(logging.DEBUG, logger=name)
    response = start(functions)
    flow_id, _ = cookie_of(response)
    authorize = response.headers["Location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    before = len(caplog.records)
    fields = sign_in(stack, authorize)  # the test playing the browser logs the URL: not ours
    del caplog.records[before:]
    pages = [page(callback(functions, fields, flow_id))]
    pages.append(page(callback(functions, fields, flow_id)))  # replay
    pages.append(page(callback(functions, dict(fields, state="x"), flow_id)))

    cache = msal.SerializableTokenCache()
    cache.deserialize(stored_cache(stack))
    tokens = [
        item["secret"]
        for kind in (
            msal.TokenCache.CredentialType.ACCESS_TOKEN,
            msal.TokenCache.CredentialType.REFRESH_TOKEN,
            msal.TokenCache.CredentialType.ID_TOKEN,
        )
        for item in cache.search(kind)
    ]
    container = clients.container_client(Settings.from_env(env))
    assert not list(container.list_blobs(name_starts_with=FLOW_PREFIX))
    secrets_ = {
        "code": fields["code"],
        "state": fields["state"],
        "nonce": query["nonce"],
        "code_challenge": query["code_challenge"],
        "cookie": flow_id,
        "client_secret": c.CLIENT_SECRET,
        **{f"token{i}": t for i, t in enumerate(tokens)},
    }
    assert len(tokens) == 3
    logged = "\n".join(
        record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        for record in caplog.records
    )
    assert "consent: token cache for" in logged  # the capture did see the flow
    assert any(r.name.startswith("msal") and r.levelno == logging.DEBUG for r in caplog.records)
    for label, value in secrets_.items():
        assert value not in logged, f"{label} leaked into a log line"
        for body in pages:
            assert value not in body, f"{label} leaked into a page"


# ---------------------------------------------------------------------------- pages


def test_pages_escape_everything_and_allow_only_their_own_style():
    from mail2blob.consent import ConsentResult

    result = ConsentResult(
        Outcome.LOGIN_REFUSED,
        "a<b>@example.com",
        detail='<script>alert("x")</script>',
        account="<i>who</i>",
        aadsts="AADSTS1<2",
        advice="<b>bold</b>",
    )
    body = consent_pages.render_result(result)
    assert "<script" not in body and "<i>" not in body and "<b>" not in body
    assert "&lt;script&gt;" in body
    style = re.search(r"<style>(.*?)</style>", body, re.S).group(1)
    digest = hashlib.sha256(style.encode()).digest()
    import base64

    assert f"'sha256-{base64.b64encode(digest).decode()}'" in consent_pages.CONTENT_SECURITY_POLICY
    assert "<script" not in consent_pages.render_waiting()


# ---------------------------------------------------------------------------- schedule


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("0 */5 * * * *", _utc(2026, 1, 1, 10, 2, 3), _utc(2026, 1, 1, 10, 5, 0)),
        ("0 */5 * * * *", _utc(2026, 1, 1, 10, 5, 0), _utc(2026, 1, 1, 10, 10, 0)),
        ("0 0 * * * *", _utc(2026, 1, 1, 23, 30, 0), _utc(2026, 1, 2, 0, 0, 0)),
        ("30 15 9 * * 1-5", _utc(2026, 1, 2, 10, 0, 0), _utc(2026, 1, 5, 9, 15, 30)),  # Fri->Mon
        ("0 0 12 1 JAN,jul *", _utc(2026, 2, 1, 0, 0, 0), _utc(2026, 7, 1, 12, 0, 0)),
        ("0 0 0 29 2 *", _utc(2026, 3, 1, 0, 0, 0), _utc(2028, 2, 29, 0, 0, 0)),
        ("*/20 * * * * *", _utc(2026, 1, 1, 0, 0, 59), _utc(2026, 1, 1, 0, 1, 0)),
        ("0 0 8 * * SUN", _utc(2026, 1, 1, 0, 0, 0), _utc(2026, 1, 4, 8, 0, 0)),
        ("0 0 8 * * 7", _utc(2026, 1, 1, 0, 0, 0), _utc(2026, 1, 4, 8, 0, 0)),
        ("0 5-10/5 * * * *", _utc(2026, 1, 1, 0, 6, 0), _utc(2026, 1, 1, 0, 10, 0)),
    ],
)
def test_next_fire_time(expression, after, expected):
    assert next_fire_time(expression, after) == expected


@pytest.mark.parametrize("expression", ["0 0 0 31 2 *"])
def test_schedule_that_never_fires(expression):
    assert next_fire_time(expression, _utc(2026, 1, 1)) is None


@pytest.mark.parametrize(
    "expression", ["00:05:00", "0 */0 * * * *", "0 61 * * * *", "0 * * * * MOO", "0 5-1 * * * *"]
)
def test_unsupported_schedules_are_described_not_computed(expression):
    with pytest.raises(ValueError):
        parse_ncrontab(expression)
    assert describe_next_drain(expression) == f"Drains run on the schedule {expression}."


def test_next_drain_text_uses_the_timer_time_zone(monkeypatch):
    now = _utc(2026, 7, 1, 10, 2, 0).timestamp()
    assert describe_next_drain("0 */5 * * * *", now) == (
        "The next scheduled drain runs at 2026-07-01 10:05:00 UTC (schedule 0 */5 * * * *)."
    )
    monkeypatch.setenv("WEBSITE_TIME_ZONE", "Europe/Berlin")
    assert describe_next_drain("0 0 14 * * *", now).startswith(
        "The next scheduled drain runs at 2026-07-01 14:00:00 CEST"
    )


# ---------------------------------------------------------------------------- docs


def test_docs_troubleshooting_table_matches_the_advice_table():
    doc = (ROOT / "README.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| AADSTS")
    }
    assert set(rows) == set(aadsts.ADVICE)
    for code, advice in aadsts.ADVICE.items():
        cells = [cell.strip() for cell in rows[code].strip("|").split("|")]
        assert cells == [code, advice.meaning, advice.action, "yes" if advice.reconsent else "no"]
