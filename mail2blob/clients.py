"""Builds the SDK clients the engine works with from ``Settings``, in the Azure SDK's way:
``DefaultAzureCredential`` (managed identity in Azure, ``AZURE_CLIENT_ID`` for a user-assigned one;
developer credentials elsewhere) unless a connection string is given.

Heavy SDK imports happen here, on first use, not at import time (Functions cold start).
"""

from __future__ import annotations

import functools
import os
from typing import Any
from urllib.parse import urlparse

from .settings import Settings
from .tls import ca_bundle_path, ssl_context

#: Key Vault DNS suffixes of the Azure clouds. For these the SDK verifies that the challenge's
#: resource matches the vault's domain; other hosts (a private DNS name, the local stack) cannot
#: match, so the check is left to TLS.
KEY_VAULT_SUFFIXES = (
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".vault.microsoftazure.de",
    ".managedhsm.azure.net",
)
#: Messages up to this size go in one PUT; larger ones as staged 4 MiB blocks (bounded memory).
MAX_SINGLE_PUT = 4 * 1024 * 1024


@functools.cache
def azure_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=os.environ.get("AZURE_CLIENT_ID"))


def _transport_options(settings: Settings) -> dict[str, Any]:
    bundle = ca_bundle_path(settings.ca_bundle)
    return {"connection_verify": bundle} if bundle else {}


def secret_client(settings: Settings) -> Any:
    from azure.keyvault.secrets import SecretClient

    host = urlparse(settings.key_vault_url).hostname or ""
    return SecretClient(
        settings.key_vault_url,
        azure_credential(),
        verify_challenge_resource=host.endswith(KEY_VAULT_SUFFIXES),
        **_transport_options(settings),
    )


def blob_service_client(settings: Settings) -> Any:
    from azure.storage.blob import BlobServiceClient

    options: dict[str, Any] = {
        "max_single_put_size": MAX_SINGLE_PUT,
        "max_block_size": MAX_SINGLE_PUT,
        **_transport_options(settings),
    }
    if settings.storage_is_connection_string:
        return BlobServiceClient.from_connection_string(settings.storage, **options)
    return BlobServiceClient(settings.storage, credential=azure_credential(), **options)


def container_client(settings: Settings) -> Any:
    return blob_service_client(settings).get_container_client(settings.container)


def token_store(settings: Settings) -> Any:
    from .tokens import KeyVaultTokenStore

    return KeyVaultTokenStore(
        secret_client(settings), settings.token_secret, mailbox=settings.mailbox
    )


def consent_hint(settings: Settings) -> str:
    """Where to consent, for error messages."""
    host = os.environ.get("WEBSITE_HOSTNAME")
    if settings.redirect_uri:
        parsed = urlparse(settings.redirect_uri)
        if parsed.scheme == "https":
            host = parsed.netloc
    link = f"https://{host}/api/consent" if host else "the Function App's /api/consent link"
    return f"Open {link} (with the function key) or run `python -m mail2blob consent`."


def mailbox_tokens(settings: Settings) -> Any:
    from .tokens import MailboxTokens, build_msal_app

    return MailboxTokens(
        token_store(settings),
        lambda cache: build_msal_app(settings, cache),
        mailbox=settings.mailbox,
        consent_hint=consent_hint(settings),
    )


def imap_source(settings: Settings, tokens: Any = None) -> Any:
    from .imap_source import ImapSource

    tokens = tokens or mailbox_tokens(settings)
    return ImapSource(
        settings.imap_host,
        settings.imap_port,
        settings.mailbox,
        tokens.access_token,
        ssl_context=ssl_context(settings.ca_bundle),
    )
