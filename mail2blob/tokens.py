"""Access tokens for the mailbox, from an MSAL token cache kept in a token store (Key Vault).

This is MSAL's token-cache pattern: the ``SerializableTokenCache`` is loaded before each use and
written back whenever it changed. Refresh tokens rotate on every refresh; the rotated one is saved
*before* the access token is used, so a crash never loses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msal

from . import aadsts
from .errors import ConsentNeededError, TokenError, TokenStoreError, azure_reason
from .settings import IMAP_APP_SCOPE, IMAP_SCOPE, Settings

logger = logging.getLogger(__name__)

CACHE_CONTENT_TYPE = "application/vnd.mail2blob.msal-token-cache+json"
#: Reconnect with a fresh token when the current one has less than this left.
REFRESH_MARGIN_S = 300
#: Tries at a token when the identity platform throttles, fails or does not answer; the waits
#: between them double from TOKEN_BACKOFF_S. MSAL itself replays a 429/5xx answer for its
#: Retry-After, or 5 s without one, so a shorter first wait would only meet that replay.
TOKEN_ATTEMPTS = 3
TOKEN_BACKOFF_S = 6.0


class TokenStore(Protocol):
    """Where the serialized MSAL token cache lives."""

    def load(self) -> str | None:
        """The serialized cache, or ``None`` when nobody has consented yet."""

    def save(self, serialized: str) -> None: ...


class KeyVaultTokenStore:
    """The token cache as one Key Vault secret; every save is a new secret version."""

    def __init__(self, secret_client: Any, secret_name: str, *, mailbox: str = "") -> None:
        self._client = secret_client
        self.secret_name = secret_name
        self._mailbox = mailbox
        self.updated_on: Any = None  # when the cache was last saved, after load()

    def load(self) -> str | None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            secret = self._client.get_secret(self.secret_name)
            self.updated_on = secret.properties.updated_on
            return secret.value
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise TokenStoreError(
                f"could not read secret {self.secret_name!r} from Key Vault: {azure_reason(exc)}"
            ) from None

    def save(self, serialized: str) -> None:
        from azure.core.exceptions import AzureError

        try:
            self._client.set_secret(
                self.secret_name,
                serialized,
                content_type=CACHE_CONTENT_TYPE,
                tags={"mailbox": self._mailbox, "written-by": "mail2blob"},
            )
        except AzureError as exc:
            raise TokenStoreError(
                f"could not write secret {self.secret_name!r} to Key Vault: {azure_reason(exc)}"
            ) from None


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_at: float  # epoch seconds
    username: str  # the account that consented (may differ from a shared mailbox)
    app_only: bool = False  # client credentials (IMAP.AccessAsApp): no user, a service principal

    def __repr__(self) -> str:  # never show the token
        return f"AccessToken(username={self.username!r}, expires_at={self.expires_at:.0f})"

    def expires_within(self, seconds: float) -> bool:
        return self.expires_at - time.time() < seconds


def client_credential(settings: Settings) -> str | dict | None:
    """The confidential client's credential: a secret, or a federated assertion from the managed
    identity (no secret anywhere), or ``None`` for a public client."""
    if settings.client_secret:
        return settings.client_secret
    if settings.fic_client_id:
        return {"client_assertion": managed_identity_assertion(settings.fic_client_id)}
    return None


def managed_identity_assertion(mi_client_id: str) -> Callable[[], str]:
    """A callable MSAL calls for a fresh client assertion: the user-assigned managed identity's
    token for ``api://AzureADTokenExchange``."""
    from azure.identity import ManagedIdentityCredential

    credential = ManagedIdentityCredential(client_id=mi_client_id)

    def assertion() -> str:
        return credential.get_token("api://AzureADTokenExchange/.default").token

    return assertion


def build_msal_app(
    settings: Settings, cache: msal.TokenCache | None = None, *, http_client: Any = None
) -> msal.ClientApplication:
    """The MSAL application for ``settings``: confidential when a secret or federated credential
    is configured, public otherwise (device code consent, "Allow public client flows")."""
    from .tls import http_session

    common = {
        "authority": settings.authority,
        "token_cache": cache,
        "http_client": http_client or http_session(settings.ca_bundle),
        # Known Microsoft hosts skip discovery anyway; other authorities (sovereign clouds, the
        # local stack) must not be validated against login.microsoftonline.com.
        "instance_discovery": False,
    }
    credential = client_credential(settings)
    if credential is None:
        return msal.PublicClientApplication(settings.client_id, **common)
    return msal.ConfidentialClientApplication(
        settings.client_id, client_credential=credential, **common
    )


class MailboxTokens:
    """Delegated access tokens for one mailbox, refreshed from the stored token cache."""

    def __init__(
        self,
        store: TokenStore,
        app_factory: Callable[[msal.SerializableTokenCache], msal.ClientApplication],
        *,
        mailbox: str,
        scopes: tuple[str, ...] = (IMAP_SCOPE,),
        consent_hint: str = "",
    ) -> None:
        self._store = store
        self._app_factory = app_factory
        self._mailbox = mailbox
        self._scopes = list(scopes)
        self._consent_hint = consent_hint
        self._lock = threading.Lock()

    def access_token(self, *, force_refresh: bool = False) -> AccessToken:
        """A valid access token; rotates and saves the refresh token when one is redeemed.
        Transient failures of the identity platform are tried again, with backoff."""
        return with_transient_retries(lambda: self._access_token(force_refresh=force_refresh))

    def _access_token(self, *, force_refresh: bool) -> AccessToken:
        with self._lock:
            serialized = self._store.load()
            if not serialized:
                raise ConsentNeededError(
                    f"no token for {self._mailbox} yet: consent is needed. {self._consent_hint}"
                )
            cache = msal.SerializableTokenCache()
            try:
                cache.deserialize(serialized)
            except ValueError:
                raise ConsentNeededError(
                    f"the stored token cache for {self._mailbox} is unreadable: consent again. "
                    f"{self._consent_hint}"
                ) from None
            app = msal_app(lambda: self._app_factory(cache))
            account = self._pick_account(app)
            try:
                result = app.acquire_token_silent_with_error(
                    self._scopes, account, force_refresh=force_refresh
                )
            except OSError as exc:  # requests' ConnectionError and timeouts are OSErrors
                raise TokenError(
                    f"the identity platform at {self._authority_of(app)} could not be reached "
                    f"({type(exc).__name__})",
                    error="unreachable",
                ) from None
            except msal.exceptions.MsalServiceError as exc:  # MSAL raises for HTTP 5xx
                raise TokenError(
                    f"the identity platform at {self._authority_of(app)} failed ({exc})",
                    error="server_error",
                ) from None
            if cache.has_state_changed:
                # Save before anything uses the token: the old refresh token may be dead now.
                self._store.save(cache.serialize())
                logger.info("token cache for %s saved (refresh token rotated)", self._mailbox)
            return self._access_token_from(result, account)

    @staticmethod
    def _authority_of(app: msal.ClientApplication) -> str:
        return getattr(app.authority, "instance", "") or "the authority"

    def _pick_account(self, app: msal.ClientApplication) -> dict:
        accounts = app.get_accounts()
        if not accounts:
            raise ConsentNeededError(
                f"the stored token cache for {self._mailbox} holds no account: consent is "
                f"needed. {self._consent_hint}"
            )
        for account in accounts:
            if account.get("username", "").lower() == self._mailbox.lower():
                return account
        return accounts[0]

    def _access_token_from(self, result: dict | None, account: dict) -> AccessToken:
        username = account.get("username", "")
        if result is None:
            raise ConsentNeededError(
                f"the stored token for {self._mailbox} (signed in as {username}) has no refresh "
                f"token left: consent is needed. {self._consent_hint}"
            )
        if "access_token" in result:
            expires_in = float(result.get("expires_in") or 0)
            return AccessToken(result["access_token"], time.time() + expires_in, username)
        raise token_failure(
            result,
            what=f"refreshing the token for {self._mailbox}",
            consent_hint=self._consent_hint,
        )


class AppTokens:
    """App-only access tokens for one mailbox: the client-credentials flow (``IMAP.AccessAsApp``,
    scope ``https://outlook.office365.com/.default``). No user, no consent link and no stored
    token cache: MSAL keeps the token in memory and asks again when it nears expiry. Exchange
    decides which mailboxes the app's service principal may open (Add-MailboxPermission)."""

    def __init__(
        self,
        app_factory: Callable[[], msal.ClientApplication],
        *,
        mailbox: str,
        client_id: str,
        scopes: tuple[str, ...] = (IMAP_APP_SCOPE,),
    ) -> None:
        self._app_factory = app_factory
        self._app: Any = None
        self._mailbox = mailbox
        self._client_id = client_id
        self._scopes = list(scopes)
        self._lock = threading.Lock()

    def access_token(self, *, force_refresh: bool = False) -> AccessToken:
        """An app-only token; transient failures are tried again, with backoff."""
        return with_transient_retries(lambda: self._access_token(force_refresh=force_refresh))

    def _access_token(self, *, force_refresh: bool) -> AccessToken:
        with self._lock:
            if self._app is None:
                self._app = msal_app(self._app_factory)
                if not isinstance(self._app, msal.ConfidentialClientApplication):
                    raise TokenError(
                        "app-only access needs a confidential client: set "
                        "MAIL2BLOB_CLIENT_SECRET or MAIL2BLOB_FIC_CLIENT_ID"
                    )
            if force_refresh:
                self._app.remove_tokens_for_client()
            try:
                result = self._app.acquire_token_for_client(self._scopes)
            except OSError as exc:
                raise TokenError(
                    f"the identity platform could not be reached ({type(exc).__name__})",
                    error="unreachable",
                ) from None
            except msal.exceptions.MsalServiceError as exc:  # MSAL raises for HTTP 5xx
                raise TokenError(
                    f"the identity platform failed ({exc})", error="server_error"
                ) from None
        if "access_token" in result:
            expires_in = float(result.get("expires_in") or 0)
            return AccessToken(
                result["access_token"],
                time.time() + expires_in,
                f"app {self._client_id}",
                app_only=True,
            )
        raise token_failure(
            result,
            what=f"getting an app-only token (client credentials) for {self._mailbox}",
            consent_hint="An admin grants consent for IMAP.AccessAsApp (Office 365 Exchange "
            "Online) on the app registration.",
        )


def with_transient_retries(get: Callable[[], AccessToken]) -> AccessToken:
    """``get()``, tried again with backoff while it fails with a transient ``TokenError``
    (unreachable, throttled, server error)."""
    for attempt in range(1, TOKEN_ATTEMPTS + 1):
        try:
            return get()
        except TokenError as exc:
            if not exc.transient or attempt == TOKEN_ATTEMPTS:
                raise
            delay = TOKEN_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning("%s; trying again in %.0f s", exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def msal_app(factory: Callable[[], msal.ClientApplication]) -> msal.ClientApplication:
    """Build the MSAL application, whose constructor fetches the authority's discovery document:
    its failures become ``TokenError`` (transient ones marked so) instead of escaping raw."""
    try:
        return factory()
    except OSError as exc:
        raise TokenError(
            f"the identity platform could not be reached ({type(exc).__name__})",
            error="unreachable",
        ) from None
    except msal.exceptions.MsalServiceError as exc:  # discovery answered 5xx
        raise TokenError(
            f"the identity platform's discovery document is unavailable ({exc})",
            error="server_error",
        ) from None
    except ValueError:  # discovery answered 4xx: no such tenant or authority
        raise TokenError(
            "the identity platform does not know the configured authority: check "
            "MAIL2BLOB_TENANT_ID and MAIL2BLOB_AUTHORITY",
            error="invalid_authority",
        ) from None


def token_failure(result: dict, *, what: str, consent_hint: str = "") -> Exception:
    """The typed error for an MSAL error result: consent needed, or a configuration problem."""
    error = str(result.get("error", "unknown"))
    code = aadsts.extract_code(result)
    explanation = aadsts.describe(code, error)
    if aadsts.needs_reconsent(code, error):
        return ConsentNeededError(
            f"{what} failed: {explanation} {consent_hint}".strip(),
            aadsts=code,
            reason=explanation,
        )
    return TokenError(f"{what} failed: {explanation}", aadsts=code, error=error)
