"""What state a mailbox is in: its token (without refreshing it), its checkpoint per folder and
its last run. Shared by ``python -m mail2blob status`` and the status HTTP function."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import msal

from .checkpoint import CheckpointStore
from .errors import Mail2BlobError
from .settings import Settings

logger = logging.getLogger(__name__)


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


def mailbox_status(settings: Settings) -> dict[str, Any]:
    from . import clients

    status: dict[str, Any] = {"mailbox": settings.mailbox, "folders": settings.folders}
    try:
        store = clients.token_store(settings)
        status["token"] = token_state(store.load())
        if store.updated_on:
            status["token"]["saved_at"] = store.updated_on.astimezone(UTC).isoformat()
    except Mail2BlobError as exc:
        status["token"] = {"state": "unknown", "detail": str(exc)}
    try:
        state = CheckpointStore(clients.container_client(settings), settings.mailbox).load()
        status["checkpoint"] = {
            name: {
                "uidvalidity": f.uidvalidity,
                "last_uid": f.last_uid,
                "failed": len(f.failed),
            }
            for name, f in state.folders.items()
        }
        status["last_run"] = state.last_run
    except Mail2BlobError as exc:
        status["checkpoint"] = {"error": str(exc)}
        status["last_run"] = None
    return status


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
