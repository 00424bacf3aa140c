"""Consent: how a token gets into the token store in the first place.

The authorization-code flow (PKCE S256, ``state``, ``nonce``, ``response_mode=form_post``) as MSAL
runs it, for the Function App's consent link and for ``python -m mail2blob consent``:

1. ``start()`` creates MSAL's flow and keeps it server-side for ten minutes in a ``FlowStore`` (a
   blob under ``.mail2blob/consent/`` in the archive container for the Function App, memory for the
   command line). The caller gets a random flow id (the browser's cookie) and the authorize URL.
2. ``finish(flow_id, params)`` takes Microsoft's answer. It checks that the flow exists, has not
   expired and that ``state`` matches, then consumes the flow (a conditional delete) *before*
   redeeming the code, so a replayed or racing callback loses. It exchanges the code, proves the
   token with an IMAP XOAUTH2 login to the configured mailbox, and only then saves the token cache.

Every way this can end is an ``Outcome`` the pages render; none of them carries a token, a code,
a ``state`` value or a secret, and neither does any log line written here.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from datetime import time as clock_time
from typing import Any, Protocol
from urllib.parse import urlsplit

import msal

from . import aadsts
from .blob_destination import STATE_PREFIX
from .errors import (
    DestinationError,
    LoginRefusedError,
    SourceError,
    TokenError,
    TokenStoreError,
    azure_reason,
)
from .imap_source import login_refused_message
from .settings import IMAP_SCOPE, Settings
from .tokens import AccessToken, TokenStore, build_msal_app, msal_app

logger = logging.getLogger(__name__)

FLOW_PREFIX = f"{STATE_PREFIX}consent/"
#: How long a started consent waits for Microsoft's answer.
FLOW_TTL_S = 600
#: Abandoned flows removed per ``start()`` (best effort, bounded).
SWEEP_LIMIT = 50
#: Callback parameters handed to MSAL; anything else in the request is ignored.
_CALLBACK_PARAMS = ("code", "state", "client_info")
_ERROR_WORD = re.compile(r"^[a-z_]{1,64}$")
_AADSTS = re.compile(r"AADSTS\d{1,9}")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")


# ---------------------------------------------------------------------------- outcomes


class Outcome(enum.Enum):
    """How a consent ended. ``status`` is the HTTP status of the page; ``consumed`` says whether
    the started flow is gone (the browser's cookie can be cleared)."""

    SAVED = ("saved", 200, True, "Consent saved")
    NO_FLOW = ("no_flow", 400, True, "No consent was started in this browser")
    UNKNOWN_FLOW = ("unknown_flow", 400, True, "This sign-in is unknown or was already used")
    EXPIRED = ("expired", 400, True, "This sign-in expired")
    STATE_MISMATCH = (
        "state_mismatch",
        400,
        False,
        "This answer does not belong to the sign-in started in this browser",
    )
    BAD_CALLBACK = ("bad_callback", 400, True, "The answer from Microsoft is incomplete")
    DENIED = ("denied", 400, True, "Microsoft did not give consent")
    TOKEN_FAILED = ("token_failed", 400, True, "Microsoft did not issue a token")
    NO_REFRESH_TOKEN = (
        "no_refresh_token",
        400,
        True,
        "Microsoft issued no refresh token",
    )
    LOGIN_REFUSED = ("login_refused", 403, True, "The mailbox refused the sign-in")
    IMAP_FAILED = ("imap_failed", 502, True, "The mailbox could not be reached")
    STORE_FAILED = ("store_failed", 500, True, "The token could not be saved")
    EXCHANGE_FAILED = (
        "exchange_failed",
        502,
        True,
        "Microsoft could not be reached to finish the sign-in",
    )
    UNAVAILABLE = ("unavailable", 503, False, "Consent is unavailable right now")

    def __init__(self, key: str, status: int, consumed: bool, title: str) -> None:
        self.key = key
        self.status = status
        self.consumed = consumed
        self.title = title


@dataclass(frozen=True)
class ConsentResult:
    """What a page or the command line shows. Every text here was written by mail2blob or comes
    from the advice table; server texts (IMAP) are included only after escaping on render."""

    outcome: Outcome
    mailbox: str
    detail: str = ""
    account: str = ""  # the account that signed in, when known
    aadsts: str | None = None
    advice: str = ""  # what the AADSTS code means and what to do
    next_drain: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SAVED

    @property
    def status(self) -> int:
        return self.outcome.status

    @property
    def title(self) -> str:
        return self.outcome.title

    def summary(self) -> str:
        """One line for a terminal or a log."""
        parts = [f"{self.title}: {self.detail}".rstrip(": ")]
        if self.advice:
            parts.append(self.advice)
        if self.next_drain:
            parts.append(self.next_drain)
        return " ".join(parts)


@dataclass(frozen=True)
class Started:
    flow_id: str  # goes into the browser's cookie; never logged
    auth_uri: str
    redirect_uri: str
    expires_at: float


# ---------------------------------------------------------------------------- flow storage


@dataclass(frozen=True)
class StoredFlow:
    flow_id: str
    record: dict[str, Any]
    etag: str

    @property
    def expires_at(self) -> float:
        return float(self.record.get("expires_at", 0))


class FlowStore(Protocol):
    """Where started flows wait for the callback. ``consume`` succeeds for exactly one caller."""

    def put(self, flow_id: str, record: dict[str, Any]) -> None: ...

    def load(self, flow_id: str) -> StoredFlow | None: ...

    def consume(self, stored: StoredFlow) -> bool:
        """Delete the flow if it is still the one loaded; ``False`` when somebody else won."""

    def sweep(self, now: float) -> int:
        """Remove flows that expired before ``now``; returns how many."""


def _flow_key(flow_id: str) -> str:
    """The name a flow is stored under: a digest of its id, so the cookie value never appears in
    storage URLs, SDK error messages or logs, and storage readers cannot rebuild the cookie."""
    return hashlib.sha256(flow_id.encode("utf-8")).hexdigest()


class MemoryFlowStore:
    """Flows in this process (the command line's one-shot listener)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flows: dict[str, tuple[dict[str, Any], str]] = {}

    def put(self, flow_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._flows[_flow_key(flow_id)] = (dict(record), secrets.token_hex(8))

    def load(self, flow_id: str) -> StoredFlow | None:
        with self._lock:
            found = self._flows.get(_flow_key(flow_id))
        if found is None:
            return None
        return StoredFlow(flow_id, dict(found[0]), found[1])

    def consume(self, stored: StoredFlow) -> bool:
        key = _flow_key(stored.flow_id)
        with self._lock:
            found = self._flows.get(key)
            if found is None or found[1] != stored.etag:
                return False
            del self._flows[key]
            return True

    def sweep(self, now: float) -> int:
        with self._lock:
            dead = [k for k, (r, _) in self._flows.items() if float(r["expires_at"]) <= now]
            for key in dead:
                del self._flows[key]
        return len(dead)


class BlobFlowStore:
    """Flows as small JSON blobs under ``.mail2blob/consent/`` in the archive container, so any
    Function App instance can finish a flow another one started."""

    def __init__(self, container: Any) -> None:
        self._container = container

    @staticmethod
    def blob_name(flow_id: str) -> str:
        return f"{FLOW_PREFIX}{_flow_key(flow_id)}.json"

    def put(self, flow_id: str, record: dict[str, Any]) -> None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        def upload() -> None:
            self._container.upload_blob(
                self.blob_name(flow_id),
                json.dumps(record).encode("utf-8"),
                overwrite=False,
                metadata={"expires_at": str(int(record["expires_at"]))},
                content_settings=ContentSettings(content_type="application/json"),
            )

        try:
            try:
                upload()
            except ResourceNotFoundError:  # no drain has created the container yet
                self._create_container()
                upload()
        except AzureError as exc:
            raise DestinationError(f"cannot store the consent flow: {azure_reason(exc)}") from None

    def _create_container(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            self._container.create_container()

    def load(self, flow_id: str) -> StoredFlow | None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            downloader = self._container.download_blob(self.blob_name(flow_id))
            data = downloader.readall()
            etag = downloader.properties.etag
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise DestinationError(f"cannot read the consent flow: {azure_reason(exc)}") from None
        try:
            record = json.loads(data.decode("utf-8"))
        except ValueError:
            logger.warning("consent: a stored flow is unreadable; treating it as unknown")
            return None
        return StoredFlow(flow_id, record, etag)

    def consume(self, stored: StoredFlow) -> bool:
        from azure.core import MatchConditions
        from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError

        try:
            self._container.delete_blob(
                self.blob_name(stored.flow_id),
                etag=stored.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceNotFoundError, ResourceModifiedError):
            return False
        except AzureError as exc:
            if getattr(exc, "status_code", None) == 412:
                return False
            raise DestinationError(
                f"cannot consume the consent flow: {azure_reason(exc)}"
            ) from None
        return True

    def sweep(self, now: float) -> int:
        from azure.core.exceptions import AzureError

        removed = 0
        try:
            for blob in self._container.list_blobs(
                name_starts_with=FLOW_PREFIX, include=["metadata"]
            ):
                if removed >= SWEEP_LIMIT:
                    break
                expires = (blob.metadata or {}).get("expires_at", "")
                if expires.isdigit() and int(expires) <= now:
                    self._container.delete_blob(blob.name)
                    removed += 1
        except AzureError as exc:
            logger.info("consent: sweeping expired flows failed (%s)", azure_reason(exc))
        return removed


def _error_word(value: object) -> str:
    """An OAuth ``error`` value fit to show (``access_denied``); anything else is "unknown"."""
    text = str(value or "")
    return text if _ERROR_WORD.match(text) else "unknown"


# ---------------------------------------------------------------------------- the flow


class _FixedToken:
    """The freshly issued access token as ``ImapSource``'s token provider."""

    def __init__(self, token: AccessToken) -> None:
        self._token = token

    def access_token(self, *, force_refresh: bool = False) -> AccessToken:
        return self._token


class Consent:
    """One configured mailbox's consent: start flows, finish them, prove and store the token."""

    def __init__(
        self,
        settings: Settings,
        flows: FlowStore,
        token_store: TokenStore,
        *,
        source_id: str = "default",
        app_factory: Callable[[msal.SerializableTokenCache], msal.ClientApplication] | None = None,
        imap_factory: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.source_id = source_id
        self.flows = flows
        self.token_store = token_store
        self._app_factory = app_factory or (lambda cache: build_msal_app(settings, cache))
        self._imap_factory = imap_factory or self._default_imap
        self._clock = clock

    def _default_imap(self, tokens: Any) -> Any:
        from .clients import imap_source

        return imap_source(self.settings, tokens)

    # -- start ----------------------------------------------------------------------------------

    def start(self, redirect_uri: str, *, login_hint: str | None = None) -> Started:
        """Begin a flow; raises ``DestinationError`` when the flow cannot be stored and
        ``TokenError`` when the identity platform cannot be reached."""
        now = self._clock()
        self.flows.sweep(now)
        app = self._build_app(msal.SerializableTokenCache())
        flow = app.initiate_auth_code_flow(
            [IMAP_SCOPE],
            redirect_uri=redirect_uri,
            login_hint=login_hint or None,
            # Always show the account picker: the browser's current account is often not the
            # one that should own the mailbox's token.
            prompt=msal.Prompt.SELECT_ACCOUNT,
            response_mode="form_post",
        )
        auth_uri = flow.pop("auth_uri")
        flow_id = secrets.token_urlsafe(32)
        expires_at = now + FLOW_TTL_S
        self.flows.put(
            flow_id,
            {
                "version": 1,
                "source": self.source_id,
                "flow": flow,
                "created_at": now,
                "expires_at": expires_at,
            },
        )
        logger.info(
            "consent started for %s (redirect URI %s, valid %d s)",
            self.settings.mailbox,
            redirect_uri,
            FLOW_TTL_S,
        )
        return Started(flow_id, auth_uri, redirect_uri, expires_at)

    def _build_app(self, cache: msal.SerializableTokenCache) -> msal.ClientApplication:
        return msal_app(lambda: self._app_factory(cache))

    # -- finish ---------------------------------------------------------------------------------

    def finish(self, flow_id: str | None, params: Mapping[str, str]) -> ConsentResult:
        """Handle Microsoft's answer for the flow the browser's cookie names."""
        if not flow_id:
            return self._result(
                Outcome.NO_FLOW,
                "There is no consent in progress in this browser (its cookie is missing). "
                "Open the consent link to start one.",
            )
        try:
            stored = self.flows.load(flow_id)
        except DestinationError as exc:
            return self._result(Outcome.UNAVAILABLE, f"{exc}. Try again in a minute.")
        if stored is None:
            return self._result(
                Outcome.UNKNOWN_FLOW,
                "This answer belongs to no consent in progress: it was already used, or it is "
                "forged. Nothing was stored.",
            )
        if stored.expires_at <= self._clock():
            self._consume_quietly(stored)
            return self._result(
                Outcome.EXPIRED,
                f"The sign-in took longer than {FLOW_TTL_S // 60} minutes. Nothing was stored.",
            )
        flow = stored.record.get("flow") or {}
        state = str(params.get("state") or "")
        expected = str(flow.get("state") or "")
        if not expected or not hmac.compare_digest(state.encode(), expected.encode()):
            logger.warning("consent callback rejected: state does not match the browser's flow")
            return self._result(
                Outcome.STATE_MISMATCH,
                "The answer's state does not match the consent started in this browser (a "
                "forged request, or a sign-in from another browser). Nothing was stored.",
            )
        try:
            won = self.flows.consume(stored)
        except DestinationError as exc:
            return self._result(Outcome.UNAVAILABLE, f"{exc}. Try again in a minute.")
        if not won:
            logger.warning("consent callback rejected: the flow was already used")
            return self._result(
                Outcome.UNKNOWN_FLOW,
                "This answer was already used (a replayed or repeated request). Nothing more was "
                "stored.",
            )
        if params.get("error"):
            return self._denied(params)
        if not params.get("code"):
            return self._result(
                Outcome.BAD_CALLBACK,
                "The answer carries neither an authorization code nor an error. Nothing was "
                "stored.",
            )
        return self._redeem(flow, {k: str(params[k]) for k in _CALLBACK_PARAMS if params.get(k)})

    def _consume_quietly(self, stored: StoredFlow) -> None:
        try:
            self.flows.consume(stored)
        except DestinationError as exc:
            logger.info("consent: removing an expired flow failed (%s)", exc)

    def _denied(self, params: Mapping[str, str]) -> ConsentResult:
        # error_description is attacker-controllable: only the AADSTS code is taken from it.
        error = _error_word(params.get("error"))
        match = _AADSTS.search(str(params.get("error_description", "")))
        code = match.group(0) if match else None
        logger.info("consent refused by the identity platform: %s %s", error, code or "")
        return self._result(
            Outcome.DENIED,
            f"Microsoft answered with the error {error}. Nothing was stored.",
            aadsts=code,
            advice=aadsts.describe(code, error),
        )

    def _redeem(self, flow: dict[str, Any], params: dict[str, str]) -> ConsentResult:
        from azure.core.exceptions import AzureError

        cache = msal.SerializableTokenCache()
        try:
            app = self._build_app(cache)
            result = app.acquire_token_by_auth_code_flow(flow, params)
        except TokenError as exc:
            return self._result(Outcome.EXCHANGE_FAILED, f"{exc}. Nothing was stored.")
        except ValueError:
            # MSAL's message quotes both state values: never pass it on.
            return self._result(
                Outcome.BAD_CALLBACK, "MSAL rejected the answer. Nothing was stored."
            )
        except (OSError, AzureError) as exc:
            # OSError: the token endpoint is unreachable. AzureError: the managed identity could
            # not provide the federated credential's assertion.
            return self._result(
                Outcome.EXCHANGE_FAILED,
                f"redeeming the code failed: {type(exc).__name__} while talking to the identity "
                "platform or the managed identity endpoint. Nothing was stored.",
            )
        return self.complete(result, cache)

    # -- shared by the auth-code and device-code flows ------------------------------------------

    def complete(self, result: dict[str, Any], cache: msal.SerializableTokenCache) -> ConsentResult:
        """Prove a token response with an IMAP login to the mailbox, then save ``cache``."""
        if "access_token" not in result:
            code = aadsts.extract_code(result)
            error = _error_word(result.get("error"))
            logger.warning("consent: token request failed: %s %s", error, code or "")
            return self._result(
                Outcome.TOKEN_FAILED,
                f"The token request failed with the error {error}. Nothing was stored.",
                aadsts=code,
                advice=aadsts.describe(code, error),
            )
        claims = result.get("id_token_claims") or {}
        account = str(claims.get("preferred_username") or claims.get("upn") or "")
        if not list(cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)):
            return self._result(
                Outcome.NO_REFRESH_TOKEN,
                "Without a refresh token mail2blob would stop working within the hour. Nothing "
                "was stored.",
                account=account,
                aadsts="AADSTS900144",
                advice=aadsts.describe("AADSTS900144"),
            )
        expires_in = float(result.get("expires_in") or 0)
        token = AccessToken(result["access_token"], self._clock() + expires_in, account)
        refused = self._prove(token)
        if refused is not None:
            return refused
        try:
            self.token_store.save(cache.serialize())
        except TokenStoreError as exc:
            return self._result(
                Outcome.STORE_FAILED, f"{exc}. The sign-in worked; try again.", account=account
            )
        logger.info(
            "consent: token cache for %s saved (signed in as %s)", self.settings.mailbox, account
        )
        return self._result(
            Outcome.SAVED,
            f"mail2blob can now read {self.settings.mailbox}.",
            account=account,
            next_drain=describe_next_drain(self.settings.schedule, self._clock()),
        )

    def _prove(self, token: AccessToken) -> ConsentResult | None:
        """Log in to the mailbox with ``token`` and open its first folder; a result when that
        fails, ``None`` when the token works."""
        mailbox, folder = self.settings.mailbox, self.settings.folders[0]
        source = self._imap_factory(_FixedToken(token))
        try:
            source.connect()
            source.select(folder)
        except LoginRefusedError as exc:
            logger.warning("consent: IMAP refused %s for %s", token.username, mailbox)
            return self._result(Outcome.LOGIN_REFUSED, str(exc), account=token.username)
        except SourceError as exc:
            text = str(exc)
            if "not connected" in text.lower():  # Exchange: token user has no rights on mailbox
                return self._result(
                    Outcome.LOGIN_REFUSED,
                    login_refused_message(mailbox, token.username, exc),
                    account=token.username,
                )
            logger.warning("consent: IMAP check for %s failed: %s", mailbox, text)
            return self._result(
                Outcome.IMAP_FAILED, f"{text}. Nothing was stored.", account=token.username
            )
        finally:
            source.close()
        return None

    def _result(self, outcome: Outcome, detail: str, **fields: Any) -> ConsentResult:
        return ConsentResult(outcome, self.settings.mailbox, detail, **fields)


def for_settings(settings: Settings, *, source_id: str = "default") -> Consent:
    """The Function App's consent: flows as blobs in the archive container, tokens in Key Vault."""
    from . import clients

    return Consent(
        settings,
        BlobFlowStore(clients.container_client(settings)),
        clients.token_store(settings),
        source_id=source_id,
    )


def for_source(
    settings: Settings, *, source_id: str | None = None, mailbox: str | None = None
) -> Consent:
    """Consent for one delegated source of ``.mail2blob/sources.json``, picked by id (the
    consent link's ``?source=``) or by mailbox (``?mailbox=``); the settings' own mailbox when
    neither is given. Raises ``SourcesError`` when the choice is unknown or ambiguous."""
    from .sources import SourcesError, load_sources

    if not source_id and not mailbox:
        return for_settings(settings)
    sources = load_sources(settings)
    if source_id:
        chosen = [s for s in sources.sources if s.id == source_id]
    else:
        chosen = list(sources.for_mailbox(mailbox or ""))
    chosen = [s for s in chosen if s.auth == "delegated"]
    if not chosen:
        wanted = f"source {source_id!r}" if source_id else f"mailbox {mailbox!r}"
        raise SourcesError([f"no delegated source drains {wanted}"])
    if len({s.token_secret or settings.token_secret for s in chosen}) > 1:
        ids = ", ".join(s.id for s in chosen)
        raise SourcesError([f"mailbox {mailbox!r} has several sources ({ids}): add ?source=<id>"])
    source = chosen[0]
    return for_settings(source.settings(settings), source_id=source.id)


def flow_source(settings: Settings, flow_id: str | None) -> str | None:
    """The source a stored flow was started for (``None`` when there is no such flow): the
    callback needs it to store the token in that source's secret."""
    from . import clients

    if not flow_id:
        return None
    stored = BlobFlowStore(clients.container_client(settings)).load(flow_id)
    return str(stored.record.get("source") or "default") if stored else None


def callback_uri(request_url: str, headers: Mapping[str, str], settings: Settings) -> str:
    """``MAIL2BLOB_REDIRECT_URI``, or ``https://<host>/<start path>/callback`` from the request
    that started the consent (``X-Forwarded-Host`` first: a front door or custom domain)."""
    if settings.redirect_uri:
        return settings.redirect_uri
    lowered = {k.lower(): v for k, v in headers.items()}
    host = (lowered.get("x-forwarded-host") or "").split(",")[0].strip()
    host = host or lowered.get("host", "").strip() or urlsplit(request_url).netloc
    if not _HOST.match(host):
        raise ValueError("the request's host header is not a host name")
    path = urlsplit(request_url).path.rstrip("/") or "/api/consent"
    return f"https://{host}{path}/callback"


# ---------------------------------------------------------------------------- schedule

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (low, high, names) per NCRONTAB field: second minute hour day month day-of-week
_FIELDS: tuple[tuple[int, int, tuple[str, ...]], ...] = (
    (0, 59, ()),
    (0, 59, ()),
    (0, 23, ()),
    (1, 31, ()),
    (1, 12, _MONTHS),
    (0, 7, _DAYS),
)


def _field_value(text: str, low: int, names: tuple[str, ...]) -> int:
    upper = text.upper()
    if upper in names:
        return names.index(upper) + low
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number")
    return int(text)


def _parse_field(text: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = int(step_text) if slash and step_text.isdigit() else 1
        if slash and (not step_text.isdigit() or step == 0):
            raise ValueError(f"bad step in {part!r}")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, b = base.split("-", 1)
            first, last = _field_value(a, low, names), _field_value(b, low, names)
        else:
            first = _field_value(base, low, names)
            last = high if slash else first
        if not low <= first <= last <= high:
            raise ValueError(f"{part!r} is out of range {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def parse_ncrontab(expression: str) -> tuple[frozenset[int], ...]:
    """The six value sets of an NCRONTAB expression (``*``, lists, ranges, steps, month and day
    names); ``ValueError`` for anything else (e.g. the ``hh:mm:ss`` TimeSpan form)."""
    parts = expression.split()
    if len(parts) != 6:
        raise ValueError("an NCRONTAB expression has six fields")
    fields = [_parse_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
    weekdays = fields[5]
    if 7 in weekdays:  # Sunday is 0 or 7
        fields[5] = (weekdays - {7}) | {0}
    return tuple(fields)


def next_fire_time(expression: str, after: datetime) -> datetime | None:
    """The first time strictly after ``after`` (timezone-aware) that the schedule fires; ``None``
    when it never does within five years. Day of month and day of week must both match, as in
    NCRONTAB."""
    seconds, minutes, hours, days, months, weekdays = parse_ncrontab(expression)
    start = after.replace(microsecond=0) + timedelta(seconds=1)
    day = start.date()
    for _ in range(366 * 5):
        if day.month in months and day.day in days and (day.weekday() + 1) % 7 in weekdays:
            first_day = day == start.date()
            for h in sorted(hours):
                if first_day and h < start.hour:
                    continue
                for m in sorted(minutes):
                    for s in sorted(seconds):
                        moment = datetime.combine(day, clock_time(h, m, s), after.tzinfo)
                        if moment >= start:
                            return moment
        day += timedelta(days=1)
    return None


def _schedule_zone() -> tzinfo:
    """The timer's time zone: ``WEBSITE_TIME_ZONE`` (an IANA name on Linux plans) or UTC."""
    name = os.environ.get("WEBSITE_TIME_ZONE", "").strip()
    if name:
        try:
            from zoneinfo import ZoneInfo

            return ZoneInfo(name)
        except (ValueError, KeyError, OSError):
            logger.info("WEBSITE_TIME_ZONE %r is not an IANA zone name; using UTC", name)
    return UTC


def describe_next_drain(schedule: str, now: float | None = None) -> str:
    """ "The next scheduled drain runs at ..." or, for forms this parser does not know, "Drains run
    on the schedule ..."."""
    zone = _schedule_zone()
    moment = datetime.fromtimestamp(time.time() if now is None else now, zone)
    try:
        fire = next_fire_time(schedule, moment)
    except ValueError:
        fire = None
    if fire is None:
        return f"Drains run on the schedule {schedule}."
    return (
        f"The next scheduled drain runs at {fire.strftime('%Y-%m-%d %H:%M:%S')} "
        f"{fire.tzname() or 'UTC'} (schedule {schedule})."
    )


# ---------------------------------------------------------------------------- logging


class _RedactMsalEvents(logging.Filter):
    """MSAL's token-cache DEBUG event carries the request's form data, including the
    authorization code and the PKCE verifier (it redacts only secrets and tokens). Those values
    are replaced before any handler sees the record."""

    SENSITIVE = ("code", "code_verifier", "device_code", "client_assertion", "nonce", "state")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "event=%s" and isinstance(record.args, tuple) and record.args:
            try:
                event = json.loads(record.args[0])
                for part in ("data", "params"):
                    section = event.get(part)
                    if isinstance(section, dict):
                        for key in self.SENSITIVE:
                            if key in section:
                                section[key] = "********"
                record.args = (json.dumps(event, indent=4, sort_keys=True),)
            except (TypeError, ValueError, AttributeError):
                record.args = ("(token cache event, redacted by mail2blob)",)
        return True


def _install_log_redaction() -> None:
    target = logging.getLogger("msal.token_cache")
    if not any(isinstance(f, _RedactMsalEvents) for f in target.filters):
        target.addFilter(_RedactMsalEvents())


_install_log_redaction()
