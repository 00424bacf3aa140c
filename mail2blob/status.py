"""What state each source is in: its token (a delegated token cache is read without refreshing
it; an app-only source asks for a client-credentials token), its checkpoint per folder, its last
run and last error. Shared by ``python -m mail2blob status`` and ``GET /api/status``."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msal

from .checkpoint import CheckpointStore
from .errors import ConsentNeededError, Mail2BlobError, TokenError
from .settings import Settings

if TYPE_CHECKING:
    from .sources import Source

logger = logging.getLogger(__name__)

#: Entra ends a refresh token after 90 days without use; warn this long before.
REFRESH_TOKEN_IDLE_LIFETIME = timedelta(days=90)
REFRESH_TOKEN_WARNING = timedelta(days=14)
#: Token states of a source that can drain ("expires" is a warning).
HEALTHY_TOKEN_STATES = ("ok", "expires")


def token_state(serialized: str | None) -> dict[str, Any]:
    """Reads the token cache offline: who consented, whether a refresh token is there and when
    the cached access token expires. No secret leaves this function."""
    if not serialized:
        return {"state": "consent_needed", "detail": "no token cache stored yet"}
    cache = msal.SerializableTokenCache()
    try:
        cache.deserialize(serialized)
    except ValueError:
        return {"state": "consent_needed", "detail": "the stored token cache is unreadable"}
    accounts = list(cache.search(msal.TokenCache.CredentialType.ACCOUNT))
    refresh_tokens = list(cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))
    access_tokens = list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN))
    expires = max((int(a.get("expires_on", 0)) for a in access_tokens), default=0)
    state = {
        "state": "ok" if refresh_tokens else "consent_needed",
        "account": accounts[0].get("username") if accounts else None,
        "refresh_token": bool(refresh_tokens),
        "access_token_expires_at": _iso(expires) if expires else None,
        "access_token_valid": expires > time.time(),
    }
    if not refresh_tokens:
        state["detail"] = "no refresh token in the cache"
    return state


def sources_status(settings: Settings, *, source_id: str | None = None) -> dict[str, Any]:
    """Every source (or only ``source_id``): token state, last run, stored counts, backlog and
    last error. What ``GET /api/status`` and ``python -m mail2blob status`` show."""
    from . import clients
    from .fanout import select_sources
    from .sources import load_sources

    container = clients.container_client(settings)
    sources = load_sources(settings, container)
    chosen = select_sources(sources, source_id) if source_id else sources.sources
    app_checks: dict[str, dict[str, Any]] = {}
    entries = [source_status(settings, s, container, app_checks) for s in chosen]
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "origin": sources.origin,
        "ok": all(e["healthy"] for e in entries if e["enabled"]),
        "sources": entries,
    }


def source_status(
    settings: Settings,
    source: Source,
    container: Any,
    app_checks: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One source. ``app_checks`` shares one client-credentials check among app-only sources."""
    from .fanout import RunLog

    narrowed = source.settings(settings)
    status = source.to_dict()
    record = RunLog(container, source).load() or {}
    if source.auth == "app":
        checks = {} if app_checks is None else app_checks
        if "app" not in checks:
            checks["app"] = app_token_state(narrowed)
        status["token"] = dict(checks["app"])
    else:
        status["token"] = delegated_token_state(narrowed, record)
    try:
        state = CheckpointStore(container, source.state_key).load()
        status["checkpoint"] = {
            name: {"uidvalidity": f.uidvalidity, "last_uid": f.last_uid, "failed": len(f.failed)}
            for name, f in state.folders.items()
        }
    except Mail2BlobError as exc:
        status["checkpoint"] = {"error": str(exc)}
    last_run = record.get("last_run")
    totals = record.get("totals") or {}
    status.update(
        last_run=last_run,
        last_success_at=record.get("last_success_at"),
        last_error=record.get("last_error"),
        totals=totals,
        stored=totals.get("stored", (last_run or {}).get("stored", 0)),
        backlog=(last_run or {}).get("backlog"),
    )
    status["healthy"] = status["token"]["state"] in HEALTHY_TOKEN_STATES and (
        last_run is None or bool(last_run.get("ok", not last_run.get("error")))
    )
    return status


def delegated_token_state(settings: Settings, record: dict[str, Any]) -> dict[str, Any]:
    """The stored token cache read offline, corrected by what the last run learned: a refresh
    token can be in the cache and still be dead (revoked, expired), which only the identity
    platform says, with an AADSTS code the run recorded."""
    from . import clients

    try:
        store = clients.token_store(settings)
        state = token_state(store.load())
    except Mail2BlobError as exc:
        return {"state": "unknown", "detail": str(exc)}
    saved_at = store.updated_on.astimezone(UTC) if store.updated_on else None
    if saved_at:
        state["saved_at"] = saved_at.isoformat()
    error = record.get("last_error") or {}
    failed_on_consent = (record.get("last_run") or {}).get("outcome") == "consent_needed"
    if failed_on_consent and error.get("kind") == ConsentNeededError.__name__:
        failed_at = _parse_time(error.get("at"))
        if saved_at is None or failed_at is None or saved_at <= failed_at:
            state.update(
                state="consent_needed",
                aadsts=error.get("aadsts"),
                detail=error.get("message"),
                since=error.get("at"),
            )
            return state
        state["detail"] = (
            f"consent renewed after the failure of {error.get('at')}; the next run confirms it"
        )
    if state["state"] == "ok" and saved_at is not None:
        # Entra ends a refresh token after 90 days without use; every refresh saves the cache.
        expires = saved_at + REFRESH_TOKEN_IDLE_LIFETIME
        state["refresh_token_expires_at"] = expires.isoformat(timespec="seconds")
        if expires - datetime.now(UTC) < REFRESH_TOKEN_WARNING:
            state["state"] = "expires"
            state["detail"] = (
                "the refresh token has not been used for a long time and expires soon: "
                "run a drain (or consent again)"
            )
    return state


def app_token_state(settings: Settings) -> dict[str, Any]:
    """App-only sources: ask for a client-credentials token now, which proves the secret or the
    federated credential and the admin consent (not the Exchange mailbox permission: the last
    run shows that)."""
    from . import clients

    try:
        token = clients.app_tokens(settings).access_token()
    except ConsentNeededError as exc:
        return {"state": "consent_needed", "aadsts": exc.aadsts, "detail": str(exc)}
    except TokenError as exc:
        return {"state": "credential_problem", "aadsts": exc.aadsts, "detail": str(exc)}
    except Mail2BlobError as exc:
        return {"state": "unknown", "detail": str(exc)}
    return {
        "state": "ok",
        # build_msal_app prefers the secret when both are set.
        "credential": "client secret" if settings.client_secret else "federated credential",
        "access_token_expires_at": _iso(int(token.expires_at)),
        "detail": "client credentials (IMAP.AccessAsApp)",
    }


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text)).astimezone(UTC)
    except ValueError:
        return None


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
