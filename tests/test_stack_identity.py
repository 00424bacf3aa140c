"""The identity stand-in, driven through the real MSAL and azure-identity clients."""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
import msal
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ManagedIdentityCredential

from tests.stack import constants as C
from tests.stack.identity import FIC_AUDIENCE, FIC_ISSUER, IdentityStandIn
from tests.stack.signing import SigningKey

REDIRECT_URI = "https://mail2blob.example/api/auth/callback"
OUTLOOK_DEFAULT = "https://outlook.office365.com/.default"
_HIDDEN_INPUT = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')
# MSAL recommends form_post; the query-mode cases here are deliberate.
pytestmark = pytest.mark.filterwarnings("ignore:response_mode='form_post' is recommended")


@pytest.fixture
def idp(fresh_identity: IdentityStandIn) -> IdentityStandIn:
    fresh_identity.add_redirect_uri(C.CLIENT_ID, REDIRECT_URI)
    return fresh_identity


@pytest.fixture
def http(idp: IdentityStandIn) -> Iterator[requests.Session]:
    """What MSAL and the "browser" use: trusts only the test CA, ignores the environment."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(idp.ca_cert_path)
    yield session
    session.close()


def confidential_app(
    idp: IdentityStandIn,
    http: requests.Session,
    cache: msal.TokenCache | None = None,
    credential: Any = C.CLIENT_SECRET,
    client_id: str = C.CLIENT_ID,
) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=idp.authority,
        instance_discovery=False,
        http_client=http,
        token_cache=cache,
    )


def browser_response(http: requests.Session, response: requests.Response) -> dict[str, str]:
    """What the redirect target would receive: the form_post fields or the 302's query."""
    if response.status_code == 302:
        return dict(parse_qsl(urlsplit(response.headers["Location"]).query))
    assert response.status_code == 200, response.text
    assert 'onload="document.forms[0].submit()"' in response.text
    assert f'method="POST" name="hiddenform" action="{REDIRECT_URI}"' in response.text
    return {name: html.unescape(value) for name, value in _HIDDEN_INPUT.findall(response.text)}


def sign_in(
    app: msal.ClientApplication,
    http: requests.Session,
    idp: IdentityStandIn,
    user: str = C.MAILBOX,
    response_mode: str = "form_post",
) -> tuple[dict[str, Any], dict[str, str]]:
    """Auth code flow with ``auto_approve``; returns the flow and the browser's auth response."""
    idp.auto_approve(user)
    flow = app.initiate_auth_code_flow(
        [C.IMAP_SCOPE], redirect_uri=REDIRECT_URI, response_mode=response_mode
    )
    reply = http.get(flow["auth_uri"], allow_redirects=False)
    return flow, browser_response(http, reply)


def signed_in_app(
    idp: IdentityStandIn, http: requests.Session
) -> tuple[msal.ConfidentialClientApplication, msal.SerializableTokenCache, dict[str, Any]]:
    cache = msal.SerializableTokenCache()
    app = confidential_app(idp, http, cache)
    flow, auth_response = sign_in(app, http, idp)
    result = app.acquire_token_by_auth_code_flow(flow, auth_response)
    assert "access_token" in result, result
    return app, cache, result


def refresh_tokens(cache: msal.SerializableTokenCache) -> set[str]:
    return {item["secret"] for item in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)}


def assert_entra_error(result: dict[str, Any] | None, error: str, code: int) -> None:
    assert result is not None
    assert result.get("error") == error, result
    assert code in result.get("error_codes", []), result
    assert result["error_description"].startswith(f"AADSTS{code}:")


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("tenant", [C.TENANT_ID, "common", "organizations"])
def test_discovery_documents(idp: IdentityStandIn, http: requests.Session, tenant: str) -> None:
    config = http.get(f"{idp.base_url}/{tenant}/v2.0/.well-known/openid-configuration").json()
    assert config["token_endpoint"] == f"{idp.base_url}/{tenant}/oauth2/v2.0/token"
    assert config["authorization_endpoint"].startswith(idp.base_url)
    assert config["device_authorization_endpoint"].endswith("/oauth2/v2.0/devicecode")
    assert config["issuer"].endswith("/v2.0")
    keys = http.get(config["jwks_uri"]).json()["keys"]
    assert [key["kid"] for key in keys] == [idp.signing_key.kid]


def test_unknown_tenant_is_an_entra_error(idp: IdentityStandIn, http: requests.Session) -> None:
    reply = http.get(f"{idp.base_url}/fabrikam.example/v2.0/.well-known/openid-configuration")
    assert reply.status_code == 400
    body = reply.json()
    assert body["error"] == "invalid_tenant" and body["error_codes"] == [90002]
    assert "\r\nTrace ID: " in body["error_description"]
    assert {"timestamp", "trace_id", "correlation_id"} <= body.keys()


# --------------------------------------------------------------------------- authorization code


@pytest.mark.parametrize("response_mode", ["form_post", "query"])
def test_auth_code_flow_gives_imap_token(
    idp: IdentityStandIn, http: requests.Session, signing_key: SigningKey, response_mode: str
) -> None:
    app = confidential_app(idp, http)
    flow, auth_response = sign_in(app, http, idp, response_mode=response_mode)
    assert auth_response["state"] == flow["state"]
    assert "client_info" in auth_response  # MSAL asks for it with client_info=1
    result = app.acquire_token_by_auth_code_flow(flow, auth_response)
    assert "access_token" in result, result
    assert "refresh_token" in result and result["token_type"] == "Bearer"

    claims = signing_key.verify(result["access_token"], audience=C.OUTLOOK_AUDIENCE)
    assert claims["iss"] == C.OUTLOOK_ISSUER
    assert claims["scp"] == "IMAP.AccessAsUser.All"
    assert claims["preferred_username"] == claims["upn"] == C.MAILBOX
    assert claims["appid"] == claims["azp"] == C.CLIENT_ID
    assert claims["oid"] == C.USERS[C.MAILBOX] and claims["tid"] == C.TENANT_ID
    assert claims["nbf"] <= time.time() < claims["exp"]
    assert jwt.get_unverified_header(result["access_token"]) == {
        "alg": "RS256",
        "kid": signing_key.kid,
        "typ": "JWT",
    }

    id_claims = signing_key.verify(result["id_token"], audience=C.CLIENT_ID)
    assert id_claims["iss"] == idp.issuer
    assert id_claims["preferred_username"] == C.MAILBOX
    assert id_claims["nonce"] == result["id_token_claims"]["nonce"]
    assert result["id_token_claims"]["oid"] == C.USERS[C.MAILBOX]

    second = confidential_app(idp, http).acquire_token_by_auth_code_flow(flow, auth_response)
    assert_entra_error(second, "invalid_grant", 54005)


def test_pkce_mismatch_is_rejected(idp: IdentityStandIn, http: requests.Session) -> None:
    app = confidential_app(idp, http)
    flow, auth_response = sign_in(app, http, idp)
    flow["code_verifier"] = "x" * 43
    assert_entra_error(
        app.acquire_token_by_auth_code_flow(flow, auth_response), "invalid_grant", 501481
    )


def test_wrong_secret_is_invalid_client(idp: IdentityStandIn, http: requests.Session) -> None:
    flow, auth_response = sign_in(confidential_app(idp, http), http, idp)
    app = confidential_app(idp, http, credential="not-the-secret")
    result = app.acquire_token_by_auth_code_flow(flow, auth_response)
    assert_entra_error(result, "invalid_client", 7000215)


def test_sign_in_page_accept_and_cancel(idp: IdentityStandIn, http: requests.Session) -> None:
    app = confidential_app(idp, http)
    flow = app.initiate_auth_code_flow(
        [C.IMAP_SCOPE], redirect_uri=REDIRECT_URI, login_hint=C.OTHER_USER
    )
    page = http.get(flow["auth_uri"])
    assert page.status_code == 200
    for address in C.USERS:
        assert f'name="user" value="{address}"' in page.text
    assert f'value="{C.OTHER_USER}" checked' in page.text  # login_hint preselects
    assert 'id="accept"' in page.text and 'id="cancel"' in page.text
    request_id = re.search(r'name="request_id" value="([^"]+)"', page.text).group(1)
    action = idp.base_url + re.search(r'action="([^"]+)"', page.text).group(1)

    accepted = http.post(
        action, data={"request_id": request_id, "user": C.OTHER_USER, "action": "accept"},
        allow_redirects=False,
    )  # fmt: skip
    assert accepted.status_code == 302
    assert accepted.headers["Location"].startswith(REDIRECT_URI + "?")
    result = app.acquire_token_by_auth_code_flow(flow, browser_response(http, accepted))
    assert result["id_token_claims"]["preferred_username"] == C.OTHER_USER

    replay = http.post(action, data={"request_id": request_id, "action": "accept"})
    assert replay.status_code == 400 and "AADSTS50089" in replay.text

    flow = app.initiate_auth_code_flow([C.IMAP_SCOPE], redirect_uri=REDIRECT_URI)
    page = http.get(flow["auth_uri"])
    request_id = re.search(r'name="request_id" value="([^"]+)"', page.text).group(1)
    cancelled = http.post(
        action, data={"request_id": request_id, "action": "cancel"}, allow_redirects=False
    )
    response = browser_response(http, cancelled)
    assert response["error"] == "access_denied"
    assert response["error_description"].startswith("AADSTS65004: User declined")
    assert response["state"] == flow["state"]
    assert app.acquire_token_by_auth_code_flow(flow, response)["error"] == "access_denied"


def test_auto_refuse(idp: IdentityStandIn, http: requests.Session) -> None:
    idp.auto_refuse()
    flow = confidential_app(idp, http).initiate_auth_code_flow(
        [C.IMAP_SCOPE], redirect_uri=REDIRECT_URI
    )
    response = browser_response(http, http.get(flow["auth_uri"], allow_redirects=False))
    assert response["error"] == "access_denied" and "AADSTS65004" in response["error_description"]


@pytest.mark.parametrize(
    ("client_id", "redirect_uri", "code"),
    [
        (C.CLIENT_ID, "https://evil.example/callback", 50011),
        (C.CLIENT_ID, REDIRECT_URI + "/", 50011),
        ("00000000-0000-0000-0000-000000000000", REDIRECT_URI, 700016),
    ],
)
def test_bad_client_or_redirect_shows_error_page_without_redirect(
    idp: IdentityStandIn, http: requests.Session, client_id: str, redirect_uri: str, code: int
) -> None:
    idp.auto_approve(C.MAILBOX)
    reply = http.get(
        f"{idp.authority}/oauth2/v2.0/authorize",
        params={
            "client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code",
            "scope": C.IMAP_SCOPE, "code_challenge": "x" * 43, "code_challenge_method": "S256",
        },
        allow_redirects=False,
    )  # fmt: skip
    assert reply.status_code == 400 and "Location" not in reply.headers
    assert f"AADSTS{code}" in reply.text


def test_pkce_is_required_at_authorize(idp: IdentityStandIn, http: requests.Session) -> None:
    reply = http.get(
        f"{idp.authority}/oauth2/v2.0/authorize",
        params={"client_id": C.CLIENT_ID, "redirect_uri": REDIRECT_URI, "response_type": "code",
                "scope": C.IMAP_SCOPE, "state": "s1"},
        allow_redirects=False,
    )  # fmt: skip
    response = browser_response(http, reply)
    assert response["error"] == "invalid_request" and response["state"] == "s1"
    assert "AADSTS9002325" in response["error_description"]


def test_public_client_localhost_redirect_any_port(
    idp: IdentityStandIn, http: requests.Session
) -> None:
    app = msal.PublicClientApplication(
        C.PUBLIC_CLIENT_ID, authority=idp.authority, instance_discovery=False, http_client=http
    )
    idp.auto_approve(C.MAILBOX)
    flow = app.initiate_auth_code_flow([C.IMAP_SCOPE], redirect_uri="http://localhost:53127")
    response = browser_response(http, http.get(flow["auth_uri"], allow_redirects=False))
    result = app.acquire_token_by_auth_code_flow(flow, response)
    assert "access_token" in result, result
    assert (
        jwt.decode(result["access_token"], options={"verify_signature": False})["appidacr"] == "0"
    )


# --------------------------------------------------------------------------- refresh tokens


def test_refresh_rotates_and_strict_mode_kills_the_old_token(
    idp: IdentityStandIn, http: requests.Session
) -> None:
    app, cache, first = signed_in_app(idp, http)
    old_state = cache.serialize()
    old_rt = refresh_tokens(cache)
    account = app.get_accounts(username=C.MAILBOX)[0]

    refreshed = app.acquire_token_silent([C.IMAP_SCOPE], account, force_refresh=True)
    assert refreshed and refreshed["access_token"] != first["access_token"]
    assert cache.has_state_changed
    assert refresh_tokens(cache) and refresh_tokens(cache) != old_rt
    assert idp.count("refresh_token") == 1

    stale_cache = msal.SerializableTokenCache()
    stale_cache.deserialize(old_state)
    stale_app = confidential_app(idp, http, stale_cache)
    stale_account = stale_app.get_accounts()[0]
    result = stale_app.acquire_token_silent_with_error(
        [C.IMAP_SCOPE], stale_account, force_refresh=True
    )
    assert_entra_error(result, "invalid_grant", 70000)

    idp.strict_rotation(False)  # real Entra: the old token still works
    lenient_cache = msal.SerializableTokenCache()
    lenient_cache.deserialize(old_state)
    lenient_app = confidential_app(idp, http, lenient_cache)
    again = lenient_app.acquire_token_silent(
        [C.IMAP_SCOPE], lenient_app.get_accounts()[0], force_refresh=True
    )
    assert again and "access_token" in again


def test_revoked_user_and_expired_refresh_token(
    idp: IdentityStandIn, http: requests.Session
) -> None:
    app, _, _ = signed_in_app(idp, http)
    account = app.get_accounts()[0]
    idp.revoke(C.MAILBOX)
    result = app.acquire_token_silent_with_error([C.IMAP_SCOPE], account, force_refresh=True)
    assert_entra_error(result, "invalid_grant", 50173)
    assert app.acquire_token_silent([C.IMAP_SCOPE], account, force_refresh=True) is None

    app, _, _ = signed_in_app(idp, http)  # a new consent works again
    idp.set_refresh_lifetime(0)
    result = app.acquire_token_silent_with_error(
        [C.IMAP_SCOPE], app.get_accounts()[0], force_refresh=True
    )
    assert_entra_error(result, "invalid_grant", 700082)


def test_throttled_refresh_respects_retry_after(
    idp: IdentityStandIn, http: requests.Session
) -> None:
    app, _, _ = signed_in_app(idp, http)
    account = app.get_accounts()[0]
    idp.fail_next(1, 429, retry_after=1)
    result = app.acquire_token_silent_with_error([C.IMAP_SCOPE], account, force_refresh=True)
    assert result and result["error"] == "temporarily_unavailable"
    assert idp.count("refresh_token") == 1
    # MSAL itself holds back while Retry-After runs: no second request reaches the server.
    app.acquire_token_silent_with_error([C.IMAP_SCOPE], account, force_refresh=True)
    assert idp.count("refresh_token") == 1
    time.sleep(1.1)
    result = app.acquire_token_silent_with_error([C.IMAP_SCOPE], account, force_refresh=True)
    assert result and "access_token" in result
    assert idp.count("refresh_token") == 2


def test_token_lifetime_setting(
    idp: IdentityStandIn, http: requests.Session, signing_key: SigningKey
) -> None:
    idp.set_token_lifetime(120)
    _, _, result = signed_in_app(idp, http)
    assert result["expires_in"] == 120
    claims = signing_key.verify(result["access_token"], audience=C.OUTLOOK_AUDIENCE)
    assert 110 <= claims["exp"] - time.time() <= 120


# --------------------------------------------------------------------------- app-only and MI


@pytest.fixture
def managed_identity(
    idp: IdentityStandIn, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ManagedIdentityCredential]:
    monkeypatch.setenv("IDENTITY_ENDPOINT", idp.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", idp.identity_header)
    monkeypatch.delenv("IDENTITY_SERVER_THUMBPRINT", raising=False)
    with ManagedIdentityCredential(client_id=C.MI_CLIENT_ID) as credential:
        yield credential


def test_managed_identity_tokens(
    managed_identity: ManagedIdentityCredential, signing_key: SigningKey
) -> None:
    assertion = managed_identity.get_token(f"{FIC_AUDIENCE}/.default")
    claims = signing_key.verify(assertion.token, audience=FIC_AUDIENCE)
    assert claims["iss"] == FIC_ISSUER and claims["sub"] == C.MI_PRINCIPAL_ID
    assert assertion.expires_on == claims["exp"]

    vault = managed_identity.get_token(f"{C.VAULT_RESOURCE}/.default")
    assert signing_key.verify(vault.token, audience=C.VAULT_RESOURCE)["appid"] == C.MI_CLIENT_ID


def test_managed_identity_rejects_unknown_identity_and_bad_header(
    idp: IdentityStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", idp.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", idp.identity_header)
    other = ManagedIdentityCredential(client_id="00000000-1111-2222-3333-444444444444")
    with pytest.raises(ClientAuthenticationError, match="No User Assigned"):
        other.get_token(f"{C.VAULT_RESOURCE}/.default")
    monkeypatch.setenv("IDENTITY_HEADER", "wrong")
    with pytest.raises(ClientAuthenticationError, match="X-IDENTITY-HEADER"):
        ManagedIdentityCredential(client_id=C.MI_CLIENT_ID).get_token(FIC_AUDIENCE + "/.default")


def test_client_assertion_from_managed_identity(
    idp: IdentityStandIn,
    http: requests.Session,
    managed_identity: ManagedIdentityCredential,
    signing_key: SigningKey,
) -> None:
    def assertion() -> str:
        return managed_identity.get_token(f"{FIC_AUDIENCE}/.default").token

    app = confidential_app(idp, http, credential={"client_assertion": assertion})
    result = app.acquire_token_for_client([OUTLOOK_DEFAULT])
    assert "access_token" in result, result
    claims = signing_key.verify(result["access_token"], audience=C.OUTLOOK_AUDIENCE)
    assert claims["roles"] == ["IMAP.AccessAsApp"] and claims["appidacr"] == "2"
    assert "preferred_username" not in claims and "scp" not in claims

    # The same assertion does not fit a client whose federated credential names another subject.
    idp.register_client(C.CLIENT_ID + "-x", fic_subjects=("someone-else",))
    other = confidential_app(
        idp, http, credential={"client_assertion": assertion}, client_id=C.CLIENT_ID + "-x"
    )
    assert_entra_error(other.acquire_token_for_client([OUTLOOK_DEFAULT]), "invalid_client", 700213)


def test_client_credentials_with_secret(
    idp: IdentityStandIn, http: requests.Session, signing_key: SigningKey
) -> None:
    app = confidential_app(idp, http)
    imap = app.acquire_token_for_client([OUTLOOK_DEFAULT])
    claims = signing_key.verify(imap["access_token"], audience=C.OUTLOOK_AUDIENCE)
    assert claims["roles"] == ["IMAP.AccessAsApp"] and claims["appid"] == C.CLIENT_ID
    vault = app.acquire_token_for_client([f"{C.VAULT_RESOURCE}/.default"])
    assert signing_key.verify(vault["access_token"], audience=C.VAULT_RESOURCE)["idtyp"] == "app"
    assert_entra_error(app.acquire_token_for_client([C.IMAP_SCOPE]), "invalid_scope", 1002012)
    assert idp.count("client_credentials") == 3


# --------------------------------------------------------------------------- device code


@pytest.fixture
def public_app(idp: IdentityStandIn, http: requests.Session) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(
        C.PUBLIC_CLIENT_ID, authority=idp.authority, instance_discovery=False, http_client=http
    )


def test_device_code_flow(
    idp: IdentityStandIn, public_app: msal.PublicClientApplication, signing_key: SigningKey
) -> None:
    flow = public_app.initiate_device_flow(scopes=[C.IMAP_SCOPE])
    assert flow["user_code"] in flow["message"]
    device_grant = "urn:ietf:params:oauth:grant-type:device_code"

    def approve_after_first_poll() -> None:
        deadline = time.monotonic() + 5
        while idp.count(device_grant) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        idp.approve_device_code(flow["user_code"], C.MAILBOX)

    approver = threading.Thread(target=approve_after_first_poll)
    approver.start()
    result = public_app.acquire_token_by_device_flow(flow)
    approver.join()
    assert "access_token" in result, result
    assert idp.count(device_grant) >= 2  # at least one authorization_pending before approval
    claims = signing_key.verify(result["access_token"], audience=C.OUTLOOK_AUDIENCE)
    assert claims["preferred_username"] == C.MAILBOX and claims["appid"] == C.PUBLIC_CLIENT_ID


def test_device_code_declined_and_expired(
    idp: IdentityStandIn, public_app: msal.PublicClientApplication
) -> None:
    flow = public_app.initiate_device_flow(scopes=[C.IMAP_SCOPE])
    idp.decline_device_code(flow["user_code"])
    assert_entra_error(
        public_app.acquire_token_by_device_flow(flow), "authorization_declined", 65004
    )
    flow = public_app.initiate_device_flow(scopes=[C.IMAP_SCOPE])
    idp.expire_device_code(flow["user_code"])
    assert_entra_error(public_app.acquire_token_by_device_flow(flow), "expired_token", 70020)


def test_device_login_page(
    idp: IdentityStandIn, http: requests.Session, public_app: msal.PublicClientApplication
) -> None:
    flow = public_app.initiate_device_flow(scopes=[C.IMAP_SCOPE])
    page = http.get(flow["verification_uri"])
    assert 'id="user_code"' in page.text and f'value="{C.MAILBOX}"' in page.text
    done = http.post(
        flow["verification_uri"],
        data={"user_code": flow["user_code"], "user": C.OTHER_USER, "action": "accept"},
    )
    assert done.status_code == 200
    result = public_app.acquire_token_by_device_flow(flow)
    assert result["id_token_claims"]["preferred_username"] == C.OTHER_USER


def test_nothing_secret_in_logs(
    idp: IdentityStandIn, http: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="tests.stack.identity")
    _, _, result = signed_in_app(idp, http)
    logged = caplog.text
    assert "grant=authorization_code" in logged
    for secret in (result["access_token"], result["refresh_token"], C.CLIENT_SECRET):
        assert secret not in logged
