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
#: Seconds Key Vault requests may take to connect and to answer (azure-core's defaults are
#: 300 s each, so a hung vault would eat the run's time budget); the SDK retries after a timeout.
HTTP_CONNECTION_TIMEOUT = 10
HTTP_READ_TIMEOUT = 30
#: Messages up to this size go in one PUT: the drain holds them whole anyway (its
#: ``large_message_bytes``). Larger ones are spooled and go as staged blocks of ``MAX_BLOCK``,
#: one block in memory at a time. Every PUT, block and block list is a billed write.
MAX_SINGLE_PUT = 8 * 1024 * 1024
MAX_BLOCK = 8 * 1024 * 1024


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
        connection_timeout=HTTP_CONNECTION_TIMEOUT,
        read_timeout=HTTP_READ_TIMEOUT,
        **_transport_options(settings),
    )


def blob_service_client(settings: Settings, *, aio: bool = False) -> Any:
    return _storage_client(settings, None, aio=aio)


def container_client(settings: Settings, *, aio: bool = False) -> Any:
    """The archive container. Made directly, not from a service client, so that closing it
    closes its connections (an aio client must be closed)."""
    return _storage_client(settings, settings.container, aio=aio)


def _storage_client(settings: Settings, container: str | None, *, aio: bool) -> Any:
    """A ``BlobServiceClient`` (or with ``container`` a ``ContainerClient``); ``aio``: from
    ``azure.storage.blob.aio`` (needs aiohttp; make it on the event loop that will use it).

    The proxy and CA variables of the environment are read here, once: left to requests
    (``trust_env``), they are re-read, and ``~/.netrc`` looked for, on every one of a drain's
    thousands of PUTs, which cost ~10% of its CPU (README "Performance")."""
    import requests.utils

    if aio:
        import azure.storage.blob.aio as blob

        credential: Any = AsyncCredential(azure_credential())
    else:
        import azure.storage.blob as blob  # type: ignore[no-redef]

        credential = azure_credential()
    cls = blob.ContainerClient if container else blob.BlobServiceClient
    names = (container,) if container else ()
    options: dict[str, Any] = {
        "max_single_put_size": MAX_SINGLE_PUT,
        "max_block_size": MAX_BLOCK,
        "use_env_settings": False,
    }
    bundle = (
        ca_bundle_path(settings.ca_bundle)
        or os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
    )
    if bundle and aio:
        options["transport"] = _aiohttp_transport(bundle)
    elif bundle:
        options["connection_verify"] = bundle

    def build(**extra: Any) -> Any:
        if settings.storage_is_connection_string:
            return cls.from_connection_string(settings.storage, *names, **options, **extra)
        return cls(settings.storage, *names, credential=credential, **options, **extra)

    client = build()
    proxies = requests.utils.get_environ_proxies(client.url)  # honours NO_PROXY
    return build(proxies=proxies) if proxies else client


def _aiohttp_transport(cafile: str) -> Any:
    """azure-core's aiohttp transport would build an SSL context from ``connection_verify`` on
    every request, and aiohttp open a new connection for each: one context for all instead."""
    import ssl

    import aiohttp
    from azure.core.pipeline.transport import AioHttpTransport

    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=cafile))
    session = aiohttp.ClientSession(connector=connector, trust_env=False)
    return AioHttpTransport(session=session, session_owner=True)


def blob_destination(settings: Settings) -> Any:
    """The archive container as the drain's destination: the sync client for its small state
    blobs, the ``aio`` one (made on the uploads' event loop) for the messages."""
    from .blob_destination import BlobDestination

    return BlobDestination(
        container_client(settings),
        async_container=functools.partial(container_client, settings, aio=True),
    )


class AsyncCredential:
    """The sync credential behind the SDK's async protocol, for the aio blob client: one
    credential (and token cache) for the whole run. A token request runs in a worker thread, so
    it never stalls the uploads' event loop."""

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        import asyncio

        return await asyncio.to_thread(self._credential.get_token, *scopes, **kwargs)

    async def close(self) -> None:
        """Nothing to close: the sync credential is shared and outlives the client."""

    async def __aenter__(self) -> AsyncCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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


def app_tokens(settings: Settings) -> Any:
    """App-only tokens (client credentials) for ``settings.mailbox``."""
    from .tokens import AppTokens, build_msal_app

    return AppTokens(
        lambda: build_msal_app(settings),
        mailbox=settings.mailbox,
        client_id=settings.client_id,
    )


def imap_source(settings: Settings, tokens: Any = None) -> Any:
    from .imap_source import ImapSource

    if tokens is None:
        tokens = app_tokens(settings) if settings.auth_mode == "app" else mailbox_tokens(settings)
    return ImapSource(
        settings.imap_host,
        settings.imap_port,
        settings.mailbox,
        tokens.access_token,
        ssl_context=ssl_context(settings.ca_bundle),
    )
