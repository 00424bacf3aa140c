"""An HTTPS stand-in for the Azure Key Vault secrets data plane, for the real ``SecretClient``.

What it reproduces (checked against ``azure-keyvault-secrets`` 4.12):

- Challenge authentication: a request without ``Authorization: Bearer`` gets ``401`` with
  ``WWW-Authenticate: Bearer authorization="<authority>", resource="https://vault.azure.net"``; a
  bearer token must be an RS256 JWT from the stack's :class:`SigningKey`, unexpired, with ``aud``
  ``https://vault.azure.net`` (or ``.../`` or the Key Vault application id). Bad tokens get the same
  challenge plus an ``Unauthorized`` error body.
- Secrets: ``PUT /secrets/{name}``, ``GET /secrets/{name}[/[{version}]]``,
  ``GET /secrets/{name}/versions``, ``GET /secrets``, ``DELETE /secrets/{name}`` (soft delete),
  ``GET|DELETE /deletedsecrets/{name}``, ``GET /deletedsecrets``,
  ``POST /deletedsecrets/{name}/recover``. Lists are paged like the service (25 per page, or
  ``maxresults``) with a ``nextLink``. Anything else answers ``501 NotImplemented``.
- Service rules: names ``^[0-9a-zA-Z-]{1,127}$`` and case-insensitive (the first spelling is kept);
  values of more than ``MAX_VALUE_CHARS`` (25 * 1024) *characters* are rejected with
  ``400 BadParameter`` (the service documents "25 KB"; a character count equals the UTF-8 byte count
  for the ASCII JSON the project stores); a name that is deleted but not purged cannot be set again
  (``409 Conflict``); a disabled secret cannot be read (``403 Forbidden``).
- ``api-version`` must be present and look like ``7.x`` or a dated version (the SDK's default is
  ``2026-04-01``).

Test controls (all thread-safe): :meth:`fail_next`, :meth:`delay_next`, :meth:`set_down`,
:meth:`require_valid_token`, :meth:`reset`, peeks :meth:`versions` / :meth:`value`, :meth:`seed`,
and the request log :attr:`requests` / :attr:`log`. Injected failures and delays only hit requests
that passed authentication, so the SDK's challenge round trip is never counted against them.

Secret values and tokens are never logged.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import re
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jwt
import pytest

from tests.stack import constants
from tests.stack.certs import TestCA
from tests.stack.signing import SigningKey

logger = logging.getLogger(__name__)

VAULT_AUDIENCES = frozenset(
    {
        constants.VAULT_RESOURCE,
        constants.VAULT_RESOURCE + "/",
        "cfa8b339-82a2-471a-a3c9-0fc0be7a4093",  # Azure Key Vault's application id
    }
)
MAX_VALUE_CHARS = 25 * 1024
PAGE_SIZE = 25
NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
API_VERSION_RE = re.compile(r"^(7\.\d+|\d{4}-\d{2}-\d{2})(-preview(\.\d+)?)?$")
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
NOT_FOUND_HINT = (
    "If you recently deleted this secret you may be able to recover it using the correct recovery "
    "command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)
_ERROR_CODES = {
    400: "BadParameter",
    401: "Unauthorized",
    403: "Forbidden",
    404: "SecretNotFound",
    409: "Conflict",
    429: "Throttled",
    500: "InternalServerError",
    501: "NotImplemented",
    503: "ServiceUnavailable",
}


class KeyVaultError(Exception):
    """An error reply in Key Vault's shape: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _ERROR_CODES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
        self.message = message


@dataclass
class SeenRequest:
    """One request as the stand-in saw it (no headers, bodies or tokens)."""

    method: str
    path: str
    query: str
    authorized: bool  # an ``Authorization: Bearer`` header was present
    status: int | None = None  # None until answered (or if the connection was dropped)


@dataclass
class _Rule:
    """A pending injected failure (``status``) or delay (``seconds``)."""

    remaining: int
    path_contains: str | None
    method: str | None
    status: int = 0
    retry_after: float | None = None
    seconds: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method.upper() == method)
            and (self.path_contains is None or self.path_contains in path)
        )


@dataclass
class _Version:
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    nbf: int | None
    exp: int | None
    created: int
    updated: int


@dataclass
class _Secret:
    name: str  # first spelling; lookups are case-insensitive
    versions: list[_Version] = field(default_factory=list)
    deleted_date: int | None = None

    @property
    def latest(self) -> _Version:
        return self.versions[-1]


class KeyVaultStandIn:
    """A Key Vault secrets endpoint on ``https://127.0.0.1:<free port>``.

    ``start()``/``stop()`` (or use it as a context manager); ``url`` is the vault URL to give
    ``SecretClient`` (with ``verify_challenge_resource=False`` and
    ``connection_verify=str(ca_cert_path)``).
    """

    def __init__(
        self,
        ca: TestCA,
        signing_key: SigningKey,
        authority: str = f"https://login.microsoftonline.com/{constants.TENANT_ID}",
    ) -> None:
        self.authority = authority
        self.ca_cert_path: Path = ca.ca_cert_path
        self._signing_key = signing_key
        cert_path, key_path = ca.issue("keyvault", ("127.0.0.1", "localhost"))
        # Loaded now: a later stand-in re-issuing "keyvault" files cannot affect this one.
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(cert_path, key_path)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._secrets: dict[str, _Secret] = {}
        self._faults: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._log: list[SeenRequest] = []
        self._down = False
        self._require_valid_token = True

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> KeyVaultStandIn:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self, self._context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="keyvault-standin",
            daemon=True,
        )
        self._thread.start()
        logger.info("Key Vault stand-in listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes delayed handlers
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> KeyVaultStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the Key Vault stand-in is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- test controls
    def fail_next(
        self,
        n: int,
        status: int = 429,
        retry_after: float | None = 1,
        path_contains: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching authenticated requests with ``status`` and a Key Vault
        error body (``Throttled`` for 429), with ``Retry-After`` unless ``retry_after`` is None."""
        with self._lock:
            self._faults.append(
                _Rule(n, path_contains, method, status=status, retry_after=retry_after)
            )

    def delay_next(
        self,
        n: int,
        seconds: float,
        path_contains: str | None = None,
        method: str | None = None,
    ) -> None:
        """Hold the next ``n`` matching authenticated requests for ``seconds`` before handling
        them. The request still takes effect afterwards, as on the service when a client gives
        up."""
        with self._lock:
            self._delays.append(_Rule(n, path_contains, method, seconds=seconds))

    def set_down(self, down: bool = True) -> None:
        """While down, every connection (open or new) is closed without a reply."""
        with self._lock:
            self._down = down
        if down and self._server is not None:
            self._server.close_connections()

    def require_valid_token(self, required: bool = True) -> None:
        """``False``: any bearer token is accepted (the challenge is still sent without one)."""
        with self._lock:
            self._require_valid_token = required

    def reset(self) -> None:
        """Forget secrets, pending failures/delays and the request log; come back up and check
        tokens again."""
        with self._lock:
            self._secrets.clear()
            self._faults.clear()
            self._delays.clear()
            self._log.clear()
            self._down = False
            self._require_valid_token = True

    def seed(
        self,
        name: str,
        value: str,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Store a new version directly (no HTTP) and return its version id."""
        with self._lock:
            return self._store(name, value, content_type, tags, {}).version

    def versions(self, name: str) -> list[str]:
        """Version ids of a live secret, oldest first ([] if unknown or deleted)."""
        with self._lock:
            secret = self._live(name)
            return [v.version for v in secret.versions] if secret else []

    def value(self, name: str, version: str | None = None) -> str | None:
        """The stored value (latest by default), or None if there is no such live secret/version."""
        with self._lock:
            secret = self._live(name)
            if secret is None:
                return None
            if version is None:
                return secret.latest.value
            found = next((v for v in secret.versions if v.version == version), None)
            return found.value if found else None

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request seen, in arrival order (query strings dropped)."""
        with self._lock:
            return [(r.method, r.path) for r in self._log]

    @property
    def log(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._log)

    # ----------------------------------------------------------------- request handling
    def _record(self, method: str, path: str, query: str, authorized: bool) -> SeenRequest:
        seen = SeenRequest(method, path, query, authorized)
        with self._lock:
            self._log.append(seen)
        return seen

    def _is_down(self) -> bool:
        with self._lock:
            return self._down

    def _take(self, rules: list[_Rule], method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in rules:
                if rule.matches(method, path):
                    rule.remaining -= 1
                    return rule
        return None

    def _authenticate(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise KeyVaultError(401, "AKV10000: Request is missing a Bearer or PoP token.")
        with self._lock:
            required = self._require_valid_token
        if not required:
            return
        try:
            claims = self._signing_key.verify(token.strip())
        except jwt.PyJWTError as exc:  # messages never quote the token
            raise KeyVaultError(
                401, f"AKV10022: Error validating token: {type(exc).__name__}: {exc}"
            ) from None
        audience = claims.get("aud")
        audiences = {audience} if isinstance(audience, str) else set(audience or ())
        if not audiences & VAULT_AUDIENCES:
            raise KeyVaultError(401, "AKV10022: Invalid audience.")

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, host: str
    ) -> tuple[int, dict[str, Any] | None]:
        """Route one authenticated request; returns ``(status, json body or None)``."""
        api_version = (query.get("api-version") or [""])[0]
        if not api_version:
            raise KeyVaultError(400, "The api-version query parameter is required.")
        if not API_VERSION_RE.match(api_version):
            raise KeyVaultError(400, f"The specified version ({api_version}) is not recognized.")
        base = f"https://{host}"
        parts = [unquote(p) for p in path.split("/")[1:]]
        collection, rest = parts[0], parts[1:]
        if rest and not NAME_RE.match(rest[0]):
            raise KeyVaultError(400, f"The request URI contains an invalid name: {rest[0]}")
        with self._lock:
            if collection == "secrets":
                return self._secrets_route(method, rest, query, body, base)
            if collection == "deletedsecrets":
                return self._deleted_route(method, rest, query, base)
        raise KeyVaultError(501, f"The Key Vault stand-in does not implement {method} {path}")

    def _secrets_route(
        self,
        method: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: bytes,
        base: str,
    ) -> tuple[int, dict[str, Any] | None]:
        if not rest and method == "GET":
            items = [self._item(s, s.latest, base, False) for s in self._sorted_live()]
            return 200, self._page(items, query, base + "/secrets")
        if len(rest) == 1 and method == "PUT":
            params = _json_object(body)
            value = params.get("value")
            if not isinstance(value, str):
                raise KeyVaultError(400, "The parameter 'value' is required and must be a string.")
            if len(value) > MAX_VALUE_CHARS:
                raise KeyVaultError(
                    400,
                    f"The secret value exceeds the maximum allowed size of 25 KB "
                    f"({len(value)} > {MAX_VALUE_CHARS} characters).",
                )
            secret = self._secrets.get(rest[0].lower())
            if secret is not None and secret.deleted_date is not None:
                raise KeyVaultError(
                    409,
                    f"Secret {secret.name} is currently in a deleted but recoverable state, and "
                    "its name cannot be reused; in this state, the secret can only be recovered "
                    "or purged.",
                )
            stored = self._store(
                rest[0],
                value,
                params.get("contentType"),
                params.get("tags"),
                params.get("attributes") or {},
            )
            return 200, self._bundle(self._secrets[rest[0].lower()], stored, base, True)
        if len(rest) == 1 and method == "DELETE":
            secret = self._require_live(rest[0])
            secret.deleted_date = int(time.time())
            return 200, self._deleted_bundle(secret, base)
        if len(rest) == 2 and rest[1] == "versions" and method == "GET":
            secret = self._require_live(rest[0])
            items = [self._item(secret, v, base, True) for v in secret.versions]
            return 200, self._page(items, query, f"{base}/secrets/{quote(secret.name)}/versions")
        if len(rest) in (1, 2) and method == "GET":
            secret = self._require_live(rest[0])
            version = rest[1] if len(rest) == 2 else ""
            found = self._find_version(secret, version)
            if not found.enabled:
                raise KeyVaultError(403, "Operation get is not allowed on a disabled secret.")
            return 200, self._bundle(secret, found, base, True)
        raise KeyVaultError(501, f"The Key Vault stand-in does not implement {method} secrets/...")

    def _deleted_route(
        self, method: str, rest: list[str], query: dict[str, list[str]], base: str
    ) -> tuple[int, dict[str, Any] | None]:
        if not rest and method == "GET":
            deleted = sorted(
                (s for s in self._secrets.values() if s.deleted_date is not None),
                key=lambda s: s.name.lower(),
            )
            items = []
            for secret in deleted:
                bundle = self._deleted_bundle(secret, base)
                bundle["id"] = f"{base}/secrets/{quote(secret.name)}"
                items.append(bundle)
            return 200, self._page(items, query, base + "/deletedsecrets")
        secret = self._secrets.get(rest[0].lower()) if rest else None
        if secret is None or secret.deleted_date is None:
            name = rest[0] if rest else ""
            raise KeyVaultError(404, f"Deleted Secret not found: {name}", code="SecretNotFound")
        if len(rest) == 1 and method == "GET":
            return 200, self._deleted_bundle(secret, base)
        if len(rest) == 1 and method == "DELETE":
            del self._secrets[secret.name.lower()]
            return 204, None
        if len(rest) == 2 and rest[1] == "recover" and method == "POST":
            secret.deleted_date = None
            return 200, self._bundle(secret, secret.latest, base, False)
        raise KeyVaultError(501, f"The Key Vault stand-in does not implement {method} deleted...")

    # ----------------------------------------------------------------- store helpers (lock held)
    def _store(
        self,
        name: str,
        value: str,
        content_type: Any,
        tags: Any,
        attributes: dict[str, Any],
    ) -> _Version:
        if not NAME_RE.match(name):
            raise KeyVaultError(400, f"The request URI contains an invalid name: {name}")
        if content_type is not None and not isinstance(content_type, str):
            raise KeyVaultError(400, "The parameter 'contentType' must be a string.")
        if tags is not None and not (
            isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())
        ):
            raise KeyVaultError(400, "The parameter 'tags' must map strings to strings.")
        if not isinstance(attributes, dict):
            raise KeyVaultError(400, "The parameter 'attributes' must be an object.")
        now = int(time.time())
        version = _Version(
            version=uuid.uuid4().hex,
            value=value,
            content_type=content_type,
            tags=tags,
            enabled=bool(attributes.get("enabled", True)),
            nbf=attributes.get("nbf"),
            exp=attributes.get("exp"),
            created=now,
            updated=now,
        )
        secret = self._secrets.setdefault(name.lower(), _Secret(name))
        secret.versions.append(version)
        return version

    def _live(self, name: str) -> _Secret | None:
        secret = self._secrets.get(name.lower())
        return secret if secret is not None and secret.deleted_date is None else None

    def _sorted_live(self) -> list[_Secret]:
        live = (s for s in self._secrets.values() if s.deleted_date is None)
        return sorted(live, key=lambda s: s.name.lower())

    def _require_live(self, name: str) -> _Secret:
        secret = self._live(name)
        if secret is None:
            raise KeyVaultError(
                404,
                f"A secret with (name/id) {name} was not found in this key vault. {NOT_FOUND_HINT}",
            )
        return secret

    @staticmethod
    def _find_version(secret: _Secret, version: str) -> _Version:
        if not version:
            return secret.latest
        for candidate in secret.versions:
            if candidate.version == version.lower():
                return candidate
        raise KeyVaultError(
            404,
            f"A secret with (name/id) {secret.name}/{version} was not found in this key vault. "
            f"{NOT_FOUND_HINT}",
        )

    @staticmethod
    def _attributes(version: _Version) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "enabled": version.enabled,
            "created": version.created,
            "updated": version.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
        }
        if version.nbf is not None:
            attributes["nbf"] = version.nbf
        if version.exp is not None:
            attributes["exp"] = version.exp
        return attributes

    def _item(self, secret: _Secret, version: _Version, base: str, with_version: bool) -> dict:
        """A SecretItem (what list operations return: no value)."""
        item_id = f"{base}/secrets/{quote(secret.name)}"
        item: dict[str, Any] = {
            "id": f"{item_id}/{version.version}" if with_version else item_id,
            "attributes": self._attributes(version),
        }
        if version.content_type is not None:
            item["contentType"] = version.content_type
        if version.tags is not None:
            item["tags"] = version.tags
        return item

    def _bundle(self, secret: _Secret, version: _Version, base: str, with_value: bool) -> dict:
        """A SecretBundle (with the value unless it describes a recovered secret)."""
        bundle = self._item(secret, version, base, True)
        if with_value:
            bundle["value"] = version.value
        return bundle

    def _deleted_bundle(self, secret: _Secret, base: str) -> dict[str, Any]:
        deleted_date = secret.deleted_date or int(time.time())
        bundle = self._bundle(secret, secret.latest, base, False)
        bundle.update(
            recoveryId=f"{base}/deletedsecrets/{quote(secret.name)}",
            deletedDate=deleted_date,
            scheduledPurgeDate=deleted_date + RECOVERABLE_DAYS * 86400,
        )
        return bundle

    @staticmethod
    def _page(items: list[dict], query: dict[str, list[str]], link: str) -> dict[str, Any]:
        try:
            size = int((query.get("maxresults") or [PAGE_SIZE])[0])
            start = int((query.get("$skiptoken") or ["0"])[0])
        except ValueError:
            raise KeyVaultError(400, "maxresults and $skiptoken must be integers.") from None
        size = max(1, min(size, PAGE_SIZE))
        api_version = (query.get("api-version") or [""])[0]
        next_link = None
        if start + size < len(items):
            next_link = (
                f"{link}?api-version={api_version}&$skiptoken={start + size}&maxresults={size}"
            )
        return {"value": items[start : start + size], "nextLink": next_link}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        params = json.loads(body or b"null")
    except ValueError:
        raise KeyVaultError(400, "The request body is not valid JSON.") from None
    if not isinstance(params, dict):
        raise KeyVaultError(400, "The request body must be a JSON object.")
    return params


class _Server(http.server.ThreadingHTTPServer):
    """Does the TLS handshake in the connection's own thread (not in the accept loop) and keeps
    track of open connections so ``set_down``/``stop`` can cut them."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        vault: KeyVaultStandIn,
        context: ssl.SSLContext,
    ) -> None:
        self.vault = vault
        self.context = context
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skips HTTPServer's getfqdn() lookup
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.vault._is_down():
            request.close()
            return
        with self._connections_lock:
            self._connections.add(request)
        try:
            request.settimeout(30)
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("Key Vault stand-in: TLS handshake failed: %s", exc)
            self._forget(request)
            return
        with self._connections_lock:
            self._connections.discard(request)
            self._connections.add(tls)
        try:
            super().finish_request(tls, client_address)
        finally:
            self._forget(tls)
            with contextlib.suppress(OSError):
                tls.close()

    def _forget(self, sock: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(sock)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Key Vault stand-in: connection error", exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid a 40 ms stall
    server_version = "mail2blob-keyvault-standin"
    sys_version = ""
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_DELETE = do_POST = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("Key Vault stand-in: " + format, *args)

    def _serve(self) -> None:
        vault = self.server.vault
        body = self._read_body()
        if body is None or vault._is_down():
            self.close_connection = True
            return
        split = urlsplit(self.path)
        authorization = self.headers.get("Authorization")
        seen = vault._record(
            self.command,
            split.path,
            split.query,
            (authorization or "").lower().startswith("bearer "),
        )
        self._seen: SeenRequest | None = seen
        seen.status = self._answer(vault, split.path, split.query, authorization, body)
        logger.debug("Key Vault stand-in: %s %s -> %s", self.command, split.path, seen.status)

    def _answer(
        self,
        vault: KeyVaultStandIn,
        path: str,
        query: str,
        authorization: str | None,
        body: bytes,
    ) -> int | None:
        """Reply to one request; returns the status sent (None if the connection was dropped)."""
        try:
            vault._authenticate(authorization)
        except KeyVaultError as exc:
            return self._send_error(exc, {"WWW-Authenticate": self._challenge(vault)})
        delay = vault._take(vault._delays, self.command, path)
        if delay is not None and vault._stopping.wait(delay.seconds):
            self.close_connection = True
            return None
        fault = vault._take(vault._faults, self.command, path)
        if fault is not None:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            message = f"Injected failure {fault.status} by the Key Vault stand-in."
            if fault.status == 429:
                message = "Request was not processed because too many requests were received."
            return self._send_error(KeyVaultError(fault.status, message), headers)
        host = self.headers.get("Host") or f"127.0.0.1:{vault.port}"
        try:
            status, payload = vault._route(
                self.command, path, parse_qs(query, keep_blank_values=True), body, host
            )
        except KeyVaultError as exc:
            return self._send_error(exc, {})
        self._send(status, payload)
        return status

    @staticmethod
    def _challenge(vault: KeyVaultStandIn) -> str:
        return f'Bearer authorization="{vault.authority}", resource="{constants.VAULT_RESOURCE}"'

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._send(411, {"error": {"code": "BadParameter", "message": "Send Content-Length."}})
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length else b""

    def _send_error(self, exc: KeyVaultError, headers: dict[str, str]) -> int:
        self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}}, headers)
        return exc.status

    def _send(
        self, status: int, payload: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        seen = getattr(self, "_seen", None)
        if seen is not None:  # recorded before the client can see the reply: tests read it then
            seen.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            if payload is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            self.send_header("x-ms-keyvault-service-version", "1.9.0.0")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeouts, set_down)
            self.close_connection = True


@pytest.fixture(scope="session")
def keyvault(test_ca: TestCA, signing_key: SigningKey) -> Iterator[KeyVaultStandIn]:
    """The session's Key Vault stand-in; call ``reset()`` for a clean vault."""
    with KeyVaultStandIn(test_ca, signing_key) as vault:
        yield vault
