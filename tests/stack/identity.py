"""HTTPS stand-in for the Microsoft identity platform (Entra ID v2.0 endpoints) and the App Service
managed identity endpoint, for tests driven through the real MSAL and azure-identity libraries.

Endpoints (``{tenant}`` is ``constants.TENANT_ID``, ``common``, ``organizations`` or
``contoso.example``):

- ``GET  /{tenant}/v2.0/.well-known/openid-configuration`` and ``GET /{tenant}/discovery/v2.0/keys``
- ``GET  /{tenant}/oauth2/v2.0/authorize`` (sign-in page, or auto approve/refuse) and ``POST`` (the
  page's Accept/Cancel)
- ``POST /{tenant}/oauth2/v2.0/token``: ``authorization_code`` (PKCE S256 required),
  ``refresh_token`` (rotating), ``client_credentials``,
  ``urn:ietf:params:oauth:grant-type:device_code``
- ``POST /{tenant}/oauth2/v2.0/devicecode``, ``GET|POST /devicelogin``,
  ``GET /{tenant}/oauth2/v2.0/logout``
- a second, plain-HTTP listener: ``GET /msi/token`` (App Service ``IDENTITY_ENDPOINT`` protocol).

Error codes returned (``error`` / ``AADSTS``):

=====================================  ====================================================
authorize, cannot redirect (page)      900144 no client_id, 700016 unknown client,
                                       900971 no redirect_uri, 50011 redirect_uri not registered,
                                       50089 unknown/used sign-in request id
authorize, redirected back             invalid_request 900144 (missing scope), 9002325 (no PKCE
                                       S256), unsupported_response_type 700054, invalid_scope
                                       70011/28000, invalid_resource 500011,
                                       access_denied 65004 (Cancel / ``auto_refuse``),
                                       login_required 50058 (``prompt=none`` while interactive)
token, client authentication           unauthorized_client 700016 (unknown client, 400),
                                       invalid_client 7000218 (no credential), 7000215 (wrong
                                       secret), 700025 (public client sent one), 50027/700027/
                                       700024/700211/700212/700213 (bad client assertion); 401
authorization_code                     invalid_grant 54005 (redeemed twice), 70008 (expired),
                                       501481 (PKCE), 500112 (redirect_uri differs),
                                       9002313 (unknown code / other client)
refresh_token                          invalid_grant 50173 (``revoke(user)``), 700082 (older than
                                       the refresh lifetime), **70000 (a rotated token reused in
                                       strict mode)**, 9002313 (unknown token / other client)
client_credentials                     invalid_scope 1002012 (not ``/.default``), invalid_resource
                                       500011
device code                            authorization_pending 70016, authorization_declined 65004,
                                       expired_token 70020
anything else                          unsupported_grant_type 70003, invalid_tenant 90002
=====================================  ====================================================

Token shapes: access tokens are v1-shaped (``iss = https://sts.windows.net/{tid}/``, ``ver 1.0``,
``appid`` and ``azp``); delegated Exchange tokens carry ``aud = https://outlook.office.com``,
``scp = IMAP.AccessAsUser.All``, ``preferred_username``/``upn``/``unique_name``; app-only Exchange
tokens carry ``roles = ["IMAP.AccessAsApp"]`` and no user claims. ``iat``/``nbf`` are back-dated
5 minutes as Entra does; ``exp = now + token lifetime``. ID tokens are v2 with
``iss = {base_url}/{tid}/v2.0`` (the discovery document's ``issuer``: this server, Entra-shaped).
The managed identity's federated assertion has ``iss = https://login.microsoftonline.com/{tid}/v2.0``
(:data:`FIC_ISSUER`, what a federated identity credential registers), ``sub = MI_PRINCIPAL_ID``.

Nothing secret is logged: only the endpoint, the grant type and the outcome.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
import pytest

from tests.stack import constants as C
from tests.stack import identity_pages as pages
from tests.stack.certs import TestCA
from tests.stack.signing import SigningKey

logger = logging.getLogger(__name__)

FIC_AUDIENCE = "api://AzureADTokenExchange"
FIC_ISSUER = f"https://login.microsoftonline.com/{C.TENANT_ID}/v2.0"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
V1_ISSUER = f"https://sts.windows.net/{C.TENANT_ID}/"
STORAGE_RESOURCE = "https://storage.azure.com"
GRAPH_RESOURCE = "https://graph.microsoft.com"
MI_RESOURCE_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-mail2blob/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/id-mail2blob"
)
MI_API_VERSION = "2019-08-01"
TENANT_ALIASES = frozenset({C.TENANT_ID, "common", "organizations", "contoso.example"})
_CLAIMS_SUPPORTED = ("sub", "iss", "aud", "exp", "iat", "nbf", "nonce", "name", "oid", "tid")
_CLAIMS_SUPPORTED += ("preferred_username", "ver")
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})

DEFAULT_TOKEN_LIFETIME = 3600
DEFAULT_REFRESH_LIFETIME = 90 * 24 * 3600
CODE_LIFETIME = 600
DEVICE_CODE_LIFETIME = 900
BACKDATE = 300  # Entra sets iat/nbf five minutes in the past


@dataclass(frozen=True)
class Resource:
    """A resource (API) the tenant knows: its token audience and what can be granted on it."""

    audience: str
    delegated: tuple[str, ...]
    app_roles: tuple[str, ...] = ()


_OUTLOOK = Resource(C.OUTLOOK_AUDIENCE, ("IMAP.AccessAsUser.All",), ("IMAP.AccessAsApp",))
RESOURCES: dict[str, Resource] = {
    "https://outlook.office365.com": _OUTLOOK,
    "https://outlook.office.com": _OUTLOOK,
    C.VAULT_RESOURCE: Resource(C.VAULT_RESOURCE, ("user_impersonation",)),
    STORAGE_RESOURCE: Resource(STORAGE_RESOURCE, ("user_impersonation",)),
    GRAPH_RESOURCE: Resource(GRAPH_RESOURCE, ("User.Read",)),
}


class SeenRequest(NamedTuple):
    method: str
    path: str
    grant_type: str | None


class EntraError(Exception):
    """An OAuth error as Entra reports it; rendered as JSON, an error page or a redirect."""

    def __init__(self, error: str, code: int, text: str, status: int = 400) -> None:
        super().__init__(f"{error} AADSTS{code}")
        self.error, self.code, self.text = error, code, text
        self.status = 401 if error == "invalid_client" else status

    @property
    def short_description(self) -> str:
        return f"AADSTS{self.code}: {self.text}"


@dataclass
class User:
    address: str
    oid: str
    name: str


@dataclass
class Client:
    client_id: str
    secret: str | None
    redirect_uris: list[str]
    public: bool
    fic_subjects: set[str]
    name: str
    sp_oid: str = ""  # the service principal's object id (oid/sub of app-only tokens)

    def accepts_redirect(self, uri: str) -> bool:
        """Exact match, except that a registered ``http://localhost`` (or 127.0.0.1) URI matches
        any port, as Entra allows for native clients."""
        if uri in self.redirect_uris:
            return True
        asked = urlsplit(uri)
        if asked.scheme != "http" or asked.hostname not in ("localhost", "127.0.0.1"):
            return False
        for registered in map(urlsplit, self.redirect_uris):
            if (
                registered.scheme == "http"
                and registered.hostname == asked.hostname
                and registered.port is None
                and registered.path.rstrip("/") == asked.path.rstrip("/")
                and not asked.query
            ):
                return True
        return False


@dataclass(frozen=True)
class ScopeRequest:
    """Parsed ``scope``: at most one resource plus the OpenID Connect scopes."""

    resource: str | None
    permissions: tuple[str, ...]  # granted permission names on ``resource``
    oidc: frozenset[str]

    @property
    def granted(self) -> list[str]:
        """The ``scope`` value of the token response (full permission URIs, like Entra)."""
        return [f"{self.resource}/{p}" for p in self.permissions] if self.resource else []


@dataclass
class AuthRequest:
    request_id: str
    client_id: str
    redirect_uri: str
    response_mode: str
    state: str | None
    nonce: str | None
    code_challenge: str
    scopes: ScopeRequest
    raw_scope: str
    login_hint: str | None
    want_client_info: bool


@dataclass
class AuthCode:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    user: str
    scopes: ScopeRequest
    expires_at: float
    redeemed: bool = False


@dataclass
class RefreshGrant:
    client_id: str
    user: str
    issued_at: float
    rotated: bool = False
    revoked: bool = False


@dataclass
class DeviceGrant:
    device_code: str
    user_code: str
    client_id: str
    scopes: ScopeRequest
    expires_at: float
    status: str = "pending"  # pending | approved | declined | expired
    user: str | None = None


@dataclass
class FailRule:
    remaining: int
    status: int
    body: Any
    retry_after: int | None
    path_contains: str


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json_reply(payload: Mapping[str, Any], status: int = 200) -> Reply:
    return Reply(status, json.dumps(payload).encode(), headers={"Cache-Control": "no-store"})


def _html_reply(text: str, status: int = 200) -> Reply:
    return Reply(status, text.encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"})


def _timestamp(epoch: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _with_params(uri: str, params: Mapping[str, str], *, fragment: bool = False) -> str:
    parts = urlsplit(uri)
    if fragment:
        return urlunsplit(parts._replace(fragment=urlencode(params)))
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return urlunsplit(parts._replace(query=query))


def _pkce_s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def parse_scopes(scope: str, *, tenant: str = C.TENANT_ID) -> ScopeRequest:
    """Parse a delegated ``scope`` parameter (``https://outlook.office365.com/.default`` grants
    every delegated permission of that resource; bare names mean Microsoft Graph)."""
    oidc: set[str] = set()
    wanted: dict[str, list[str]] = {}
    for item in scope.split():
        if item in OIDC_SCOPES:
            oidc.add(item)
            continue
        resource, _, permission = (
            item.rpartition("/") if "://" in item else (GRAPH_RESOURCE, "", item)
        )
        wanted.setdefault(resource.rstrip("/"), []).append(permission)
    if len(wanted) > 1:
        raise EntraError(
            "invalid_scope",
            28000,
            "Provided value for the input parameter scope is not valid because it contains more "
            "than one resource.",
        )
    if not wanted:
        # Only OpenID scopes: Entra issues a Microsoft Graph User.Read token.
        return ScopeRequest(GRAPH_RESOURCE, ("User.Read",), frozenset(oidc))
    resource_uri, permissions = next(iter(wanted.items()))
    resource = RESOURCES.get(resource_uri)
    if resource is None:
        raise _unknown_resource(resource_uri, tenant)
    granted: list[str] = []
    for permission in permissions:
        if permission == ".default":
            granted.extend(resource.delegated)
        elif permission in resource.delegated:
            granted.append(permission)
        else:
            raise EntraError(
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' isn't valid. The scope "
                f"{resource_uri}/{permission} isn't valid.",
            )
    return ScopeRequest(resource_uri, tuple(dict.fromkeys(granted)), frozenset(oidc))


def _unknown_resource(resource: str, tenant: str) -> EntraError:
    return EntraError(
        "invalid_resource",
        500011,
        f"The resource principal named {resource} was not found in the tenant named {tenant}. "
        "This can happen if the application has not been installed by the administrator of the "
        "tenant or consented to by any user in the tenant.",
    )


def _missing(name: str) -> EntraError:
    return EntraError(
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def _bad_grant(code: int, text: str) -> EntraError:
    return EntraError("invalid_grant", code, text)


_MALFORMED = (9002313, "Invalid request. Request is malformed or invalid.")


class _Server(http.server.ThreadingHTTPServer):
    """Threading HTTP(S) server. With ``ssl_context`` set, the TLS handshake runs in the request
    thread, so a stalled client cannot block the accept loop."""

    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None
    route: Callable[[str, str, dict[str, str], bytes], Reply]

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.debug("TLS handshake from %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            reply = self.server.route(method, self.path, dict(self.headers.items()), body)
        except Exception:
            logger.exception("identity stand-in failed on %s %s", method, urlsplit(self.path).path)
            reply = _json_reply({"error": "server_error"}, 500)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        # The default logs the request line, whose query may hold state/nonce: path only.
        logger.debug("%s %s", self.command, urlsplit(self.path).path)


class IdentityStandIn:
    """Entra ID v2.0 endpoints on ``https://127.0.0.1:{port}`` plus the managed identity endpoint
    on ``http://127.0.0.1:{mi_port}/msi/token``. All controls are thread-safe."""

    def __init__(self, ca: TestCA, signing_key: SigningKey) -> None:
        self.signing_key = signing_key
        self.ca_cert_path = ca.ca_cert_path
        self._cert_path, self._key_path = ca.issue("identity", ("127.0.0.1", "localhost"))
        self.identity_header = secrets.token_urlsafe(24)
        self.device_poll_interval = 1  # seconds MSAL waits between device-code polls (Entra: 5)
        self._lock = threading.RLock()
        self._clients: dict[str, Client] = {}
        self._users: dict[str, User] = {}
        self._servers: list[http.server.HTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.mi_port = 0
        self._reset_state()
        self.register_client(
            C.CLIENT_ID,
            secret=C.CLIENT_SECRET,
            fic_subjects=(C.MI_PRINCIPAL_ID,),
            name="mail2blob",
        )
        self.register_client(
            C.PUBLIC_CLIENT_ID,
            public=True,
            redirect_uris=("http://localhost",),
            name="mail2blob CLI",
        )
        for address, oid in C.USERS.items():
            self.add_user(address, oid)

    # ------------------------------------------------------------------ lifecycle and addresses
    def start(self) -> IdentityStandIn:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert_path, self._key_path)
        https = _Server(("127.0.0.1", 0), _Handler)
        https.ssl_context = context
        https.route = self._route
        msi = _Server(("127.0.0.1", 0), _Handler)
        msi.route = self._route_msi
        self.port, self.mi_port = https.server_address[1], msi.server_address[1]
        for server in (https, msi):
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        logger.info("identity stand-in on %s (managed identity on %s)", self.base_url, self.mi_port)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> IdentityStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{C.TENANT_ID}"

    @property
    def issuer(self) -> str:
        """The discovery document's ``issuer`` and the ``iss`` of ID tokens."""
        return f"{self.base_url}/{C.TENANT_ID}/v2.0"

    @property
    def identity_endpoint(self) -> str:
        """Value for ``IDENTITY_ENDPOINT`` (with ``IDENTITY_HEADER`` = :attr:`identity_header`)."""
        return f"http://127.0.0.1:{self.mi_port}/msi/token"

    # ------------------------------------------------------------------ test controls
    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        redirect_uris: tuple[str, ...] | list[str] = (),
        public: bool = False,
        fic_subjects: tuple[str, ...] | list[str] = (),
        name: str | None = None,
    ) -> None:
        """Register (or replace) an application. Confidential unless ``public``."""
        with self._lock:
            self._clients[client_id] = Client(
                client_id=client_id,
                secret=secret,
                redirect_uris=list(redirect_uris),
                public=public,
                fic_subjects=set(fic_subjects),
                name=name or f"app {client_id[:8]}",
                sp_oid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{client_id}")),
            )

    def add_redirect_uri(self, client_id: str, uri: str) -> None:
        with self._lock:
            client = self._clients[client_id]
            if uri not in client.redirect_uris:
                client.redirect_uris.append(uri)

    def add_user(self, address: str, oid: str | None = None, name: str | None = None) -> User:
        """Add a user of the tenant (``oid`` defaults to a stable uuid5 of the address)."""
        user = User(
            address=address,
            oid=oid or str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{address.lower()}")),
            name=name or address.split("@")[0].replace(".", " ").title(),
        )
        with self._lock:
            self._users[address.lower()] = user
        return user

    def user(self, address: str) -> User:
        with self._lock:
            return self._users[address.lower()]

    def auto_approve(self, user: str) -> None:
        """``/authorize`` skips the page and signs ``user`` in with consent."""
        with self._lock:
            self._known_user(user)
            self._mode = ("approve", user)

    def auto_refuse(self) -> None:
        """``/authorize`` skips the page and answers ``access_denied`` (AADSTS65004)."""
        with self._lock:
            self._mode = ("refuse", None)

    def interactive(self) -> None:
        """``/authorize`` shows the sign-in page (the default)."""
        with self._lock:
            self._mode = ("interactive", None)

    def revoke(self, user: str) -> None:
        """Kill every refresh token of ``user`` (like "Revoke sessions"): AADSTS50173."""
        with self._lock:
            key = self._known_user(user).address.lower()
            for grant in self._refresh.values():
                if grant.user.lower() == key:
                    grant.revoked = True

    def set_token_lifetime(self, seconds: int) -> None:
        """Lifetime of access tokens issued from now on (``expires_in``)."""
        with self._lock:
            self._token_lifetime = int(seconds)

    def set_refresh_lifetime(self, seconds: int) -> None:
        """Refresh tokens older than this are dead (AADSTS700082). Applies to existing ones too,
        so ``set_refresh_lifetime(0)`` expires every refresh token at once."""
        with self._lock:
            self._refresh_lifetime = float(seconds)

    def strict_rotation(self, strict: bool = True) -> None:
        """When strict (default) a refresh token that was used once is dead (AADSTS70000);
        otherwise it stays valid, as in real Entra."""
        with self._lock:
            self._strict = bool(strict)

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        body: Mapping[str, Any] | str | bytes | None = None,
        retry_after: int | None = None,
        path_contains: str = "/token",
    ) -> None:
        """Answer the next ``n`` requests whose path contains ``path_contains`` with ``status``
        (body: an Entra-shaped error unless given; ``Retry-After`` when ``retry_after``).
        Applies to both listeners: the default ``/token`` also matches ``/msi/token``."""
        with self._lock:
            self._failures.append(FailRule(n, status, body, retry_after, path_contains))

    def approve_device_code(self, user_code: str, user: str) -> None:
        with self._lock:
            grant = self._device_by_user_code(user_code)
            grant.user = self._known_user(user).address
            grant.status = "approved"

    def decline_device_code(self, user_code: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).status = "declined"

    def expire_device_code(self, user_code: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).status = "expired"

    def reset(self) -> None:
        """Back to defaults (interactive, lifetimes, strict rotation, no failures, empty request
        log) and forget every outstanding request, code, refresh token and device code. Registered
        clients and users stay."""
        with self._lock:
            self._reset_state()

    @property
    def requests(self) -> list[SeenRequest]:
        """Every request seen on both listeners: ``(method, path, grant_type)``."""
        with self._lock:
            return list(self._seen)

    def count(self, grant_type: str) -> int:
        """How many token requests used ``grant_type`` (e.g. ``"refresh_token"``)."""
        with self._lock:
            return sum(1 for seen in self._seen if seen.grant_type == grant_type)

    def mint_access_token(
        self,
        user: str,
        *,
        client_id: str = C.CLIENT_ID,
        scope: str = C.IMAP_SCOPE,
        lifetime: int | None = None,
        **overrides: Any,
    ) -> str:
        """A delegated access token as ``/token`` would issue it, without any flow; ``overrides``
        replace claims (e.g. ``exp=``, ``aud=``) for negative tests."""
        with self._lock:
            claims = self._user_access_claims(
                self._clients[client_id], self._known_user(user), parse_scopes(scope), "1", lifetime
            )
        claims.update(overrides)
        return self.signing_key.sign(claims)

    # ------------------------------------------------------------------ internal state
    def _reset_state(self) -> None:
        self._mode: tuple[str, str | None] = ("interactive", None)
        self._token_lifetime = DEFAULT_TOKEN_LIFETIME
        self._refresh_lifetime = float(DEFAULT_REFRESH_LIFETIME)
        self._strict = True
        self._failures: list[FailRule] = []
        self._seen: list[SeenRequest] = []
        self._pending: dict[str, AuthRequest] = {}
        self._codes: dict[str, AuthCode] = {}
        self._refresh: dict[str, RefreshGrant] = {}
        self._devices: dict[str, DeviceGrant] = {}

    def _known_user(self, address: str) -> User:
        user = self._users.get(address.lower())
        if user is None:
            raise KeyError(f"unknown user {address!r}; add_user() it first")
        return user

    def _device_by_user_code(self, user_code: str) -> DeviceGrant:
        wanted = user_code.replace("-", "").strip().upper()
        for grant in self._devices.values():
            if grant.user_code == wanted:
                return grant
        raise KeyError(f"no device code with user code {user_code!r}")

    def _user_list(self) -> list[tuple[str, str]]:
        return [(user.address, user.name) for user in self._users.values()]

    # ------------------------------------------------------------------ routing
    def _record_and_maybe_fail(
        self, method: str, path: str, grant_type: str | None
    ) -> Reply | None:
        with self._lock:
            self._seen.append(SeenRequest(method, path, grant_type))
            rule = next((r for r in self._failures if r.path_contains in path), None)
            if rule is None:
                return None
            rule.remaining -= 1
            if rule.remaining <= 0:
                self._failures.remove(rule)
        logger.info("%s %s grant=%s -> injected %s", method, path, grant_type, rule.status)
        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else {}
        if rule.body is None:
            error = "temporarily_unavailable" if rule.status in (429, 503) else "server_error"
            reply = self._error_reply(
                EntraError(error, 50196, "The server terminated an operation.", rule.status), {}
            )
        elif isinstance(rule.body, Mapping):
            reply = _json_reply(rule.body, rule.status)
        else:
            raw = rule.body.encode() if isinstance(rule.body, str) else bytes(rule.body)
            is_json = raw.lstrip().startswith((b"{", b"["))
            reply = Reply(rule.status, raw, "application/json" if is_json else "text/plain")
        reply.headers.update(headers)
        return reply

    def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        parts = urlsplit(target)
        path = parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        grant_type = form.get("grant_type") if path.endswith("/token") else None
        injected = self._record_and_maybe_fail(method, path, grant_type)
        if injected is not None:
            return injected
        segments = path.strip("/").split("/")
        if segments == ["devicelogin"]:
            return self._device_login(method, form)
        tenant, rest = segments[0], "/".join(segments[1:])
        handlers: dict[tuple[str, str], Callable[[str, dict[str, str], dict[str, str]], Reply]] = {
            ("GET", "v2.0/.well-known/openid-configuration"): self._discovery,
            ("GET", "discovery/v2.0/keys"): self._keys,
            ("GET", "discovery/keys"): self._keys,
            ("GET", "oauth2/v2.0/authorize"): self._authorize_get,
            ("POST", "oauth2/v2.0/authorize"): self._authorize_post,
            ("POST", "oauth2/v2.0/token"): self._token,
            ("POST", "oauth2/v2.0/devicecode"): self._devicecode,
            ("GET", "oauth2/v2.0/logout"): self._logout,
        }
        handler = handlers.get((method, rest))
        if handler is None:
            return _json_reply({"error": "not_found", "error_description": f"No route {path}"}, 404)
        if tenant not in TENANT_ALIASES:
            err = EntraError(
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud.",
            )
            return self._error_reply(err, headers)
        try:
            return handler(tenant, query if method == "GET" else form, headers)
        except EntraError as err:
            logger.info(
                "%s %s grant=%s -> %s AADSTS%s", method, path, grant_type, err.error, err.code
            )
            return self._error_reply(err, headers)

    def _error_reply(self, err: EntraError, headers: Mapping[str, str]) -> Reply:
        trace_id = str(uuid.uuid4())
        correlation_id = _header(headers, "client-request-id") or str(uuid.uuid4())
        stamp = _timestamp()
        description = (
            f"{err.short_description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}"
            f"\r\nTimestamp: {stamp}"
        )
        return _json_reply(
            {
                "error": err.error,
                "error_description": description,
                "error_codes": [err.code],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"{self.base_url}/error?code={err.code}",
            },
            err.status,
        )

    def _error_page(self, err: EntraError, headers: Mapping[str, str]) -> Reply:
        details = {
            "Request Id": str(uuid.uuid4()),
            "Correlation Id": _header(headers, "client-request-id") or str(uuid.uuid4()),
            "Timestamp": _timestamp(),
        }
        logger.info("authorize -> error page AADSTS%s", err.code)
        return _html_reply(pages.error_page(code=err.code, message=err.text, details=details), 400)

    # ------------------------------------------------------------------ discovery
    def _discovery(self, tenant: str, _q: dict[str, str], _h: dict[str, str]) -> Reply:
        base = f"{self.base_url}/{tenant}"
        issuer_tenant = C.TENANT_ID if tenant == C.TENANT_ID else "{tenantid}"
        return _json_reply(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code"],
                "scopes_supported": sorted(OIDC_SCOPES),
                "issuer": f"{self.base_url}/{issuer_tenant}/v2.0",
                "request_uri_parameter_supported": False,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "code_challenge_methods_supported": ["S256"],
                "grant_types_supported": [
                    "authorization_code",
                    "refresh_token",
                    "client_credentials",
                    DEVICE_CODE_GRANT,
                ],
                "claims_supported": list(_CLAIMS_SUPPORTED),
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "msgraph_host": "graph.microsoft.com",
            }
        )

    def _keys(self, _tenant: str, _q: dict[str, str], _h: dict[str, str]) -> Reply:
        return _json_reply({"keys": [dict(self.signing_key.jwk(), issuer=self.issuer)]})

    def _logout(self, _tenant: str, query: dict[str, str], _h: dict[str, str]) -> Reply:
        target = query.get("post_logout_redirect_uri")
        if target:
            return Reply(302, headers={"Location": target})
        return _html_reply(pages.message_page("Signed out", "You signed out of your account."))

    # ------------------------------------------------------------------ authorize
    def _authorize_get(self, tenant: str, query: dict[str, str], headers: dict[str, str]) -> Reply:
        with self._lock:
            client_id = query.get("client_id", "")
            if not client_id:
                return self._error_page(_missing("client_id"), headers)
            client = self._clients.get(client_id)
            if client is None:
                return self._error_page(self._unknown_client(client_id, tenant), headers)
            redirect_uri = query.get("redirect_uri", "")
            if not redirect_uri:
                return self._error_page(
                    EntraError("invalid_request", 900971, "No reply address provided."), headers
                )
            if not client.accepts_redirect(redirect_uri):
                err = EntraError(
                    "invalid_request",
                    50011,
                    f"The redirect URI '{redirect_uri}' specified in the request does not match "
                    f"the redirect URIs configured for the application '{client_id}'. Make sure "
                    "the redirect URI sent in the request matches one added to your application "
                    "in the Azure portal.",
                )
                return self._error_page(err, headers)
            response_mode = query.get("response_mode") or "query"
            if response_mode not in ("query", "form_post", "fragment"):
                response_mode = "query"
            state = query.get("state")
            try:
                request = self._check_authorize(client, query, response_mode, tenant)
            except EntraError as err:
                logger.info("authorize -> %s AADSTS%s", err.error, err.code)
                return self._respond(redirect_uri, response_mode, _redirect_error(err, state))
            mode, auto_user = self._mode
            prompt_none = query.get("prompt") == "none"
            if mode == "approve" and auto_user:
                return self._approve(request, auto_user)
            if mode == "refuse":
                return self._refuse(request)
            if prompt_none:
                err = EntraError(
                    "login_required",
                    50058,
                    "A silent sign-in request was sent but no user is signed in.",
                )
                return self._respond(redirect_uri, response_mode, _redirect_error(err, state))
            self._pending[request.request_id] = request
            return self._sign_in_page(tenant, request, client, request.login_hint)

    def _check_authorize(
        self, client: Client, query: dict[str, str], response_mode: str, tenant: str
    ) -> AuthRequest:
        if query.get("response_type") != "code":
            raise EntraError(
                "unsupported_response_type",
                700054,
                f"response_type '{query.get('response_type', '')}' is not enabled for the "
                "application; this stand-in supports only 'code'.",
            )
        raw_scope = query.get("scope", "")
        if not raw_scope:
            raise _missing("scope")
        scopes = parse_scopes(raw_scope, tenant=tenant)
        challenge = query.get("code_challenge", "")
        if not challenge or query.get("code_challenge_method") != "S256":
            raise EntraError(
                "invalid_request",
                9002325,
                "Proof Key for Code Exchange is required: send code_challenge with "
                "code_challenge_method=S256.",
            )
        return AuthRequest(
            request_id=secrets.token_urlsafe(16),
            client_id=client.client_id,
            redirect_uri=query["redirect_uri"],
            response_mode=response_mode,
            state=query.get("state"),
            nonce=query.get("nonce"),
            code_challenge=challenge,
            scopes=scopes,
            raw_scope=raw_scope,
            login_hint=query.get("login_hint"),
            want_client_info=query.get("client_info") == "1",
        )

    def _sign_in_page(
        self,
        tenant: str,
        request: AuthRequest,
        client: Client,
        selected: str | None,
        error: str | None = None,
    ) -> Reply:
        shown_scopes = request.scopes.granted + sorted(request.scopes.oidc)
        page = pages.sign_in_page(
            action=f"/{tenant}/oauth2/v2.0/authorize",
            request_id=request.request_id,
            app_name=client.name,
            client_id=client.client_id,
            scopes=shown_scopes,
            users=self._user_list(),
            selected=selected,
            error=error,
        )
        return _html_reply(page)

    def _authorize_post(self, tenant: str, form: dict[str, str], headers: dict[str, str]) -> Reply:
        with self._lock:
            request = self._pending.pop(form.get("request_id", ""), None)
            if request is None:
                err = EntraError(
                    "invalid_request",
                    50089,
                    "Authentication failed due to flow token expired: the sign-in request is "
                    "unknown or was already answered. Start the sign-in again.",
                )
                return self._error_page(err, headers)
            if form.get("action") == "cancel":
                return self._refuse(request)
            address = form.get("user", "")
            problem = None
            if not address:
                problem = "Pick an account to continue."
            elif address.lower() not in self._users:
                problem = (
                    f"AADSTS50034: The user account {address} does not exist in the "
                    f"{C.TENANT_ID} directory."
                )
            if problem:
                self._pending[request.request_id] = request
                client = self._clients[request.client_id]
                return self._sign_in_page(tenant, request, client, address or None, problem)
            return self._approve(request, address)

    def _approve(self, request: AuthRequest, address: str) -> Reply:
        user = self._known_user(address)
        code = secrets.token_urlsafe(48)
        self._codes[code] = AuthCode(
            client_id=request.client_id,
            redirect_uri=request.redirect_uri,
            code_challenge=request.code_challenge,
            nonce=request.nonce,
            user=user.address,
            scopes=request.scopes,
            expires_at=time.time() + CODE_LIFETIME,
        )
        params = {"code": code}
        if request.want_client_info:
            params["client_info"] = _client_info(user)
        if request.state is not None:
            params["state"] = request.state
        params["session_state"] = str(uuid.uuid4())
        logger.info("authorize -> code issued (%s)", request.response_mode)
        return self._respond(request.redirect_uri, request.response_mode, params)

    def _refuse(self, request: AuthRequest) -> Reply:
        params = {
            "error": "access_denied",
            "error_description": "AADSTS65004: User declined to consent to access the app.",
        }
        if request.state is not None:
            params["state"] = request.state
        logger.info("authorize -> access_denied")
        return self._respond(request.redirect_uri, request.response_mode, params)

    @staticmethod
    def _respond(redirect_uri: str, response_mode: str, params: dict[str, str]) -> Reply:
        if response_mode == "form_post":
            return _html_reply(pages.form_post_page(redirect_uri, params))
        location = _with_params(redirect_uri, params, fragment=response_mode == "fragment")
        return Reply(302, headers={"Location": location, "Cache-Control": "no-store"})

    # ------------------------------------------------------------------ token endpoint
    def _token(self, tenant: str, form: dict[str, str], headers: dict[str, str]) -> Reply:
        grant_type = form.get("grant_type", "")
        if not grant_type:
            raise _missing("grant_type")
        grants: dict[str, Callable[[Client, str, dict[str, str]], dict[str, Any]]] = {
            "authorization_code": self._grant_code,
            "refresh_token": self._grant_refresh,
            "client_credentials": self._grant_client_credentials,
            DEVICE_CODE_GRANT: self._grant_device_code,
        }
        grant = grants.get(grant_type)
        if grant is None:
            raise EntraError(
                "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        with self._lock:
            client, appidacr = self._authenticate(form, headers, tenant)
            payload = grant(client, appidacr, form)
        logger.info("token grant=%s -> 200", grant_type)
        return _json_reply(payload)

    def _unknown_client(self, client_id: str, tenant: str) -> EntraError:
        return EntraError(
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory "
            f"'{tenant}'. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant.",
        )

    def _authenticate(
        self, form: dict[str, str], headers: Mapping[str, str], tenant: str
    ) -> tuple[Client, str]:
        """Client authentication; returns the client and its ``appidacr`` (0 public, 1 secret,
        2 assertion)."""
        basic_id, basic_secret = _basic_auth(headers)
        client_id = form.get("client_id") or basic_id
        if not client_id:
            raise _missing("client_id")
        client = self._clients.get(client_id)
        if client is None:
            raise self._unknown_client(client_id, tenant)
        secret = form.get("client_secret") or basic_secret
        assertion = form.get("client_assertion")
        if client.public:
            if secret or assertion:
                raise EntraError(
                    "invalid_client",
                    700025,
                    "Client is public so neither 'client_assertion' nor 'client_secret' should "
                    "be presented.",
                )
            return client, "0"
        if assertion:
            self._verify_assertion(client, assertion, form.get("client_assertion_type", ""))
            return client, "2"
        if not secret:
            raise EntraError(
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        if client.secret is None or not hmac.compare_digest(secret, client.secret):
            raise EntraError(
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is "
                f"the client secret value, not the client secret ID, for a secret added to app "
                f"'{client.client_id}'.",
            )
        return client, "1"

    def _verify_assertion(self, client: Client, assertion: str, assertion_type: str) -> None:
        """A federated credential: a JWT signed by this stand-in's key (what the managed identity
        endpoint hands out), checked against the client's registered subjects."""
        if assertion_type != CLIENT_ASSERTION_TYPE:
            raise EntraError(
                "invalid_client",
                700027,
                f"client_assertion_type must be '{CLIENT_ASSERTION_TYPE}'.",
            )
        try:
            claims = jwt.decode(
                assertion,
                self.signing_key.private_key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "require": ["exp", "iss", "sub", "aud"]},
            )
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as exc:
            raise EntraError(
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range ({exc}). Current time: "
                f"{_timestamp()}.",
            ) from None
        except jwt.InvalidSignatureError:
            raise EntraError(
                "invalid_client", 700027, "Client assertion failed signature validation."
            ) from None
        except jwt.InvalidTokenError:
            raise EntraError(
                "invalid_client", 50027, "JWT token is invalid or malformed."
            ) from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        checks = (
            (claims["iss"] == FIC_ISSUER, 700211, "issuer", claims["iss"]),
            (FIC_AUDIENCE in audiences, 700212, "audience", " ".join(audiences)),
            (claims["sub"] in client.fic_subjects, 700213, "subject", claims["sub"]),
        )
        for ok, code, what, value in checks:
            if not ok:
                raise EntraError(
                    "invalid_client",
                    code,
                    f"No matching federated identity record found for presented assertion "
                    f"{what} '{value}'. Please check your federated identity credential Subject, "
                    "Audience and Issuer against the presented assertion.",
                )

    def _grant_code(self, client: Client, appidacr: str, form: dict[str, str]) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise _missing("code")
        record = self._codes.get(code)
        if record is None or record.client_id != client.client_id:
            raise _bad_grant(*_MALFORMED)
        if record.redeemed:
            raise _bad_grant(
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        if time.time() >= record.expires_at:
            raise _bad_grant(
                70008,
                "The provided authorization code or refresh token has expired due to inactivity.",
            )
        if form.get("redirect_uri") != record.redirect_uri:
            raise _bad_grant(
                500112,
                "The reply address does not match the reply address provided when requesting "
                "Authorization code.",
            )
        verifier = form.get("code_verifier", "")
        if not verifier or not hmac.compare_digest(_pkce_s256(verifier), record.code_challenge):
            raise _bad_grant(
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the "
                "authorization request.",
            )
        record.redeemed = True
        scopes = parse_scopes(form["scope"]) if form.get("scope") else record.scopes
        user = self._known_user(record.user)
        return self._user_tokens(client, user, scopes, appidacr, nonce=record.nonce)

    def _grant_refresh(self, client: Client, appidacr: str, form: dict[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise _missing("refresh_token")
        record = self._refresh.get(token)
        if record is None or record.client_id != client.client_id:
            raise _bad_grant(*_MALFORMED)
        issued = _timestamp(record.issued_at)
        if record.revoked:
            raise _bad_grant(
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token is "
                f"needed. The user might have changed or reset their password. The grant was "
                f"issued on '{issued}' and the TokensValidFrom date (before which tokens are not "
                f"valid) for this user is '{_timestamp()}'.",
            )
        if time.time() >= record.issued_at + self._refresh_lifetime:
            raise _bad_grant(
                700082,
                f"The refresh token has expired due to inactivity. The token was issued on "
                f"{issued} and was inactive for {int(self._refresh_lifetime)} seconds.",
            )
        if record.rotated and self._strict:
            raise _bad_grant(
                70000,
                "The provided grant is invalid: this refresh token was already used and has been "
                "replaced by a newer one (strict rotation).",
            )
        record.rotated = True
        scopes = parse_scopes(form.get("scope") or "openid profile offline_access")
        user = self._known_user(record.user)
        return self._user_tokens(client, user, scopes, appidacr, nonce=None, always_refresh=True)

    def _grant_client_credentials(
        self, client: Client, appidacr: str, form: dict[str, str]
    ) -> dict[str, Any]:
        if client.public:
            raise EntraError(
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        scope = form.get("scope", "")
        if not scope:
            raise _missing("scope")
        items = scope.split()
        if len(items) != 1 or not items[0].endswith("/.default"):
            raise EntraError(
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must "
                "have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        resource_uri = items[0].removesuffix("/.default").rstrip("/")
        resource = RESOURCES.get(resource_uri)
        if resource is None:
            raise _unknown_resource(resource_uri, C.TENANT_ID)
        claims = self._app_claims(
            resource.audience, client.client_id, client.sp_oid, appidacr, self._token_lifetime
        )
        if resource.app_roles:
            claims["roles"] = list(resource.app_roles)
        return {
            "token_type": "Bearer",
            "expires_in": self._token_lifetime,
            "ext_expires_in": self._token_lifetime,
            "access_token": self.signing_key.sign(claims),
        }

    def _grant_device_code(
        self, client: Client, appidacr: str, form: dict[str, str]
    ) -> dict[str, Any]:
        device_code = form.get("device_code")
        if not device_code:
            raise _missing("device_code")
        grant = self._devices.get(device_code)
        if grant is None or grant.client_id != client.client_id:
            raise _bad_grant(*_MALFORMED)
        if grant.status == "expired" or time.time() >= grant.expires_at:
            grant.status = "expired"
            raise EntraError(
                "expired_token",
                70020,
                "The provided value for the input parameter 'device_code' is not valid. This "
                "device code has expired.",
            )
        if grant.status == "declined":
            del self._devices[device_code]
            raise EntraError(
                "authorization_declined", 65004, "User declined to consent to access the app."
            )
        if grant.status == "pending" or grant.user is None:
            raise EntraError(
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            )
        del self._devices[device_code]
        user = self._known_user(grant.user)
        return self._user_tokens(client, user, grant.scopes, appidacr, nonce=None)

    # ------------------------------------------------------------------ device authorization
    def _devicecode(self, tenant: str, form: dict[str, str], _h: dict[str, str]) -> Reply:
        with self._lock:
            client_id = form.get("client_id", "")
            if not client_id:
                raise _missing("client_id")
            if client_id not in self._clients:
                raise self._unknown_client(client_id, tenant)
            if not form.get("scope"):
                raise _missing("scope")
            scopes = parse_scopes(form["scope"], tenant=tenant)
            alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
            user_code = "".join(secrets.choice(alphabet) for _ in range(9))
            device_code = secrets.token_urlsafe(48)
            self._devices[device_code] = DeviceGrant(
                device_code, user_code, client_id, scopes, time.time() + DEVICE_CODE_LIFETIME
            )
        verification_uri = f"{self.base_url}/devicelogin"
        logger.info("devicecode -> issued")
        return _json_reply(
            {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": verification_uri,
                "expires_in": DEVICE_CODE_LIFETIME,
                "interval": self.device_poll_interval,
                "message": f"To sign in, use a web browser to open the page {verification_uri} "
                f"and enter the code {user_code} to authenticate.",
            }
        )

    def _device_login(self, method: str, form: dict[str, str]) -> Reply:
        """The page behind ``verification_uri``: the browser-side of the device code flow."""
        with self._lock:
            users = self._user_list()
            if method == "GET":
                return _html_reply(pages.device_login_page(action="/devicelogin", users=users))
            user_code = form.get("user_code", "")
            try:
                if form.get("action") == "cancel":
                    self.decline_device_code(user_code)
                    return _html_reply(
                        pages.message_page("Sign-in declined", "You declined the sign-in.")
                    )
                self.approve_device_code(user_code, form.get("user", ""))
            except KeyError:
                page = pages.device_login_page(
                    action="/devicelogin",
                    users=users,
                    user_code=user_code,
                    error="That code or account wasn't recognised. Check both and try again.",
                )
                return _html_reply(page, 400)
        return _html_reply(
            pages.message_page(
                "You're signed in",
                "You have signed in to the application on your device. You may now close this "
                "window.",
            )
        )

    # ------------------------------------------------------------------ managed identity
    def _route_msi(self, method: str, target: str, headers: dict[str, str], _body: bytes) -> Reply:
        parts = urlsplit(target)
        injected = self._record_and_maybe_fail(method, parts.path, None)
        if injected is not None:
            return injected
        if method != "GET" or parts.path != "/msi/token":
            return _msi_error(404, "Not found.")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        presented = _header(headers, "X-IDENTITY-HEADER") or ""
        if not hmac.compare_digest(presented, self.identity_header):
            logger.info("managed identity -> 401 (bad X-IDENTITY-HEADER)")
            return _msi_error(401, "The X-IDENTITY-HEADER is missing or invalid.")
        if query.get("api-version") != MI_API_VERSION:
            return _msi_error(400, f"api-version must be {MI_API_VERSION}.")
        requested = query.get("resource", "")
        if not requested:
            return _msi_error(400, "The resource parameter is required.")
        identity_checks = (
            ("client_id", C.MI_CLIENT_ID),
            ("object_id", C.MI_PRINCIPAL_ID),
            ("principal_id", C.MI_PRINCIPAL_ID),
            ("mi_res_id", MI_RESOURCE_ID),
        )
        for name, known in identity_checks:
            if query.get(name) and query[name].lower() != known.lower():
                return _msi_error(
                    400,
                    "No User Assigned or Delegated Managed Identity found for specified "
                    "ClientId/ResourceId/PrincipalId.",
                )
        resource_uri = requested.removesuffix("/.default").rstrip("/")
        with self._lock:
            lifetime = self._token_lifetime
            if resource_uri == FIC_AUDIENCE:
                claims = self._federated_assertion_claims(lifetime)
            elif resource_uri in RESOURCES:
                audience = RESOURCES[resource_uri].audience
                claims = self._app_claims(
                    audience, C.MI_CLIENT_ID, C.MI_PRINCIPAL_ID, "2", lifetime
                )
                claims["xms_mirid"] = MI_RESOURCE_ID
            else:
                return _msi_error(
                    400, _unknown_resource(resource_uri, C.TENANT_ID).short_description
                )
        logger.info("managed identity -> token for %s", resource_uri)
        return _json_reply(
            {
                "access_token": self.signing_key.sign(claims),
                "expires_on": str(claims["exp"]),
                "resource": requested,
                "token_type": "Bearer",
                "client_id": C.MI_CLIENT_ID,
            }
        )

    # ------------------------------------------------------------------ token contents
    @staticmethod
    def _times(lifetime: int) -> dict[str, int]:
        now = int(time.time())
        return {"iat": now - BACKDATE, "nbf": now - BACKDATE, "exp": now + lifetime}

    def _federated_assertion_claims(self, lifetime: int) -> dict[str, Any]:
        return {
            "aud": FIC_AUDIENCE,
            "iss": FIC_ISSUER,
            **self._times(lifetime),
            "azp": C.MI_CLIENT_ID,
            "azpacr": "2",
            "idtyp": "app",
            "oid": C.MI_PRINCIPAL_ID,
            "sub": C.MI_PRINCIPAL_ID,
            "tid": C.TENANT_ID,
            "uti": secrets.token_urlsafe(16),
            "ver": "2.0",
            "xms_mirid": MI_RESOURCE_ID,
        }

    def _app_claims(
        self, audience: str, app_id: str, sp_oid: str, appidacr: str, lifetime: int
    ) -> dict[str, Any]:
        return {
            "aud": audience,
            "iss": V1_ISSUER,
            **self._times(lifetime),
            "appid": app_id,
            "appidacr": appidacr,
            "azp": app_id,
            "idp": V1_ISSUER,
            "idtyp": "app",
            "oid": sp_oid,
            "sub": sp_oid,
            "tid": C.TENANT_ID,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }

    def _user_access_claims(
        self,
        client: Client,
        user: User,
        scopes: ScopeRequest,
        appidacr: str,
        lifetime: int | None = None,
    ) -> dict[str, Any]:
        resource = RESOURCES[scopes.resource or GRAPH_RESOURCE]
        return {
            "aud": resource.audience,
            "iss": V1_ISSUER,
            **self._times(self._token_lifetime if lifetime is None else lifetime),
            "acr": "1",
            "amr": ["pwd"],
            "app_displayname": client.name,
            "appid": client.client_id,
            "appidacr": appidacr,
            "azp": client.client_id,
            "idtyp": "user",
            "ipaddr": "127.0.0.1",
            "name": user.name,
            "oid": user.oid,
            "preferred_username": user.address,
            "scp": " ".join(scopes.permissions),
            "sub": _pairwise_sub(user.oid, resource.audience),
            "tid": C.TENANT_ID,
            "unique_name": user.address,
            "upn": user.address,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }

    def _user_tokens(
        self,
        client: Client,
        user: User,
        scopes: ScopeRequest,
        appidacr: str,
        *,
        nonce: str | None,
        always_refresh: bool = False,
    ) -> dict[str, Any]:
        """The token response of the user grants (code, refresh, device code)."""
        lifetime = self._token_lifetime
        response: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(scopes.granted + sorted(scopes.oidc - {"offline_access"})),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": self.signing_key.sign(
                self._user_access_claims(client, user, scopes, appidacr, lifetime)
            ),
        }
        if always_refresh or "offline_access" in scopes.oidc:
            refresh_token = "1.AR" + secrets.token_urlsafe(64)
            self._refresh[refresh_token] = RefreshGrant(client.client_id, user.address, time.time())
            response["refresh_token"] = refresh_token
        if "openid" in scopes.oidc:
            id_claims: dict[str, Any] = {
                "aud": client.client_id,
                "iss": self.issuer,
                **self._times(DEFAULT_TOKEN_LIFETIME),
                "name": user.name,
                "oid": user.oid,
                "preferred_username": user.address,
                "sub": _pairwise_sub(user.oid, client.client_id),
                "tid": C.TENANT_ID,
                "uti": secrets.token_urlsafe(16),
                "ver": "2.0",
            }
            if nonce is not None:
                id_claims["nonce"] = nonce
            response["id_token"] = self.signing_key.sign(id_claims)
        response["client_info"] = _client_info(user)
        return response


def _pairwise_sub(oid: str, audience: str) -> str:
    """Entra's ``sub`` is unique per user and application."""
    return _b64url(hashlib.sha256(f"{oid}|{audience}".encode()).digest())


def _client_info(user: User) -> str:
    return _b64url(json.dumps({"uid": user.oid, "utid": C.TENANT_ID}).encode())


def _redirect_error(err: EntraError, state: str | None) -> dict[str, str]:
    params = {"error": err.error, "error_description": err.short_description}
    if state is not None:
        params["state"] = state
    return params


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def _basic_auth(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    value = _header(headers, "Authorization") or ""
    if not value.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(value[6:]).decode()
    except ValueError:
        return None, None
    client_id, _, secret = decoded.partition(":")
    return client_id, secret


def _msi_error(status: int, message: str) -> Reply:
    return _json_reply({"statusCode": status, "message": message}, status)


@pytest.fixture(scope="session")
def identity(test_ca: TestCA, signing_key: SigningKey) -> Iterator[IdentityStandIn]:
    """The identity stand-in for the whole session (state is shared: see ``fresh_identity``)."""
    stand_in = IdentityStandIn(test_ca, signing_key).start()
    try:
        yield stand_in
    finally:
        stand_in.stop()


@pytest.fixture
def fresh_identity(identity: IdentityStandIn) -> Iterator[IdentityStandIn]:
    """The session's stand-in, ``reset()`` before and after the test."""
    identity.reset()
    try:
        yield identity
    finally:
        identity.reset()
