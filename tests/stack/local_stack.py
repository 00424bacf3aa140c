"""The local stack as one thing: Dovecot, Azurite and the identity and Key Vault stand-ins, plus
the settings that point mail2blob at them and a consented token cache in the vault.

Used by the ``stack`` fixture, ``scripts/devstack`` and the demo.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import msal
import requests

from tests.stack import constants as c

#: The redirect URI the test-side consent uses (any registered URI works: nothing listens on it).
SEED_REDIRECT_URI = "https://mail2blob.localtest/api/consent/callback"


_HIDDEN = re.compile(r'<input type="hidden" name="([^"]*)" value="([^"]*)"')
_ACTION = re.compile(r'<form id="hiddenform" method="POST" name="hiddenform" action="([^"]*)"')


def form_post(page: str) -> tuple[str, dict[str, str]]:
    """Where a ``response_mode=form_post`` auto-submit page posts, and the fields it posts, as a
    browser would."""
    action = _ACTION.search(page)
    fields = {unescape(name): unescape(value) for name, value in _HIDDEN.findall(page)}
    return (unescape(action.group(1)) if action else ""), fields


@dataclass
class Stack:
    ca: Any
    signing_key: Any
    dovecot: Any
    azurite: Any
    identity: Any
    keyvault: Any

    def azure_env(self) -> dict[str, str]:
        """What Azure sets in a Function App with a user-assigned identity: the managed identity
        endpoint (here the identity stand-in's) and the identity's client id."""
        return {
            "IDENTITY_ENDPOINT": self.identity.identity_endpoint,
            "IDENTITY_HEADER": self.identity.identity_header,
            "AZURE_CLIENT_ID": c.MI_CLIENT_ID,
        }

    def env(self, **overrides: str) -> dict[str, str]:
        """MAIL2BLOB_* settings for the stack; keyword overrides drop the prefix
        (``after="delete"``)."""
        values = {
            "MAIL2BLOB_TENANT_ID": c.TENANT_ID,
            "MAIL2BLOB_CLIENT_ID": c.CLIENT_ID,
            "MAIL2BLOB_CLIENT_SECRET": c.CLIENT_SECRET,
            "MAIL2BLOB_AUTHORITY": self.identity.authority,
            "MAIL2BLOB_KEY_VAULT_URL": self.keyvault.url,
            "MAIL2BLOB_TOKEN_SECRET": "mail2blob-token-cache",
            "MAIL2BLOB_MAILBOX": c.MAILBOX,
            "MAIL2BLOB_IMAP_HOST": self.dovecot.host,
            "MAIL2BLOB_IMAP_PORT": str(self.dovecot.port),
            "MAIL2BLOB_FOLDERS": "INBOX",
            "MAIL2BLOB_STORAGE": self.azurite.connection_string,
            "MAIL2BLOB_CONTAINER": "mail",
            "MAIL2BLOB_AFTER": "keep",
            "MAIL2BLOB_SCHEDULE": "0 */5 * * * *",
            "MAIL2BLOB_CA_BUNDLE": str(self.ca.ca_cert_path),
            "MAIL2BLOB_TIME_BUDGET": "600",
        }
        for key, value in overrides.items():
            values["MAIL2BLOB_" + key.upper()] = value
        return values

    def msal_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.ca.ca_cert_path)
        return session

    def sign_in(
        self, authorize_url: str, user: str | None = c.MAILBOX
    ) -> tuple[str, dict[str, str]]:
        """Play the browser at the identity stand-in's authorize URL: approve as ``user``
        (``None``: refuse). Returns the form_post page's target and fields."""
        if user is None:
            self.identity.auto_refuse()
        else:
            self.identity.auto_approve(user)
        try:
            answer = self.msal_session().get(authorize_url, allow_redirects=False, timeout=10)
        finally:
            self.identity.interactive()
        assert answer.status_code == 200, answer.text
        return form_post(answer.text)

    def consent(
        self, user: str = c.MAILBOX, *, secret_name: str = "mail2blob-token-cache"
    ) -> msal.SerializableTokenCache:
        """Run the authorization-code flow (PKCE) for ``user`` through the identity stand-in, as a
        browser would, and store the resulting token cache in the vault stand-in."""
        from azure.keyvault.secrets import SecretClient

        from mail2blob.clients import azure_credential
        from mail2blob.tokens import KeyVaultTokenStore

        self.identity.add_redirect_uri(c.CLIENT_ID, SEED_REDIRECT_URI)
        session = self.msal_session()
        cache = msal.SerializableTokenCache()
        app = msal.ConfidentialClientApplication(
            c.CLIENT_ID,
            client_credential=c.CLIENT_SECRET,
            authority=self.identity.authority,
            instance_discovery=False,
            http_client=session,
            token_cache=cache,
        )
        flow = app.initiate_auth_code_flow(
            [c.IMAP_SCOPE], redirect_uri=SEED_REDIRECT_URI, response_mode="form_post"
        )
        _, params = self.sign_in(flow["auth_uri"], user)
        result = app.acquire_token_by_auth_code_flow(flow, params)
        assert "access_token" in result, result.get("error_description")
        for key, value in self.azure_env().items():
            os.environ.setdefault(key, value)
        client = SecretClient(
            self.keyvault.url,
            azure_credential(),
            verify_challenge_resource=False,
            connection_verify=str(self.ca.ca_cert_path),
        )
        KeyVaultTokenStore(client, secret_name, mailbox=c.MAILBOX).save(cache.serialize())
        return cache


def start_local_stack(directory: Path) -> tuple[Stack, Callable[[], None]]:
    """Start every part of the stack in ``directory``; returns the stack and its stop function
    (for the devstack, the demo and the benchmark; tests use the session fixtures instead)."""
    from tests.stack.azurite import Azurite
    from tests.stack.certs import TestCA
    from tests.stack.dovecot import Dovecot
    from tests.stack.identity import IdentityStandIn
    from tests.stack.keyvault import KeyVaultStandIn
    from tests.stack.signing import SigningKey

    directory.mkdir(parents=True, exist_ok=True)
    ca = TestCA(directory / "ca")
    key = SigningKey()
    stoppers: list[Callable[[], None]] = []

    def stop() -> None:
        for stopper in reversed(stoppers):
            try:
                stopper()
            except Exception as exc:  # noqa: BLE001 - stop the rest regardless
                print(f"stopping a stack part failed: {exc}")

    try:
        identity = IdentityStandIn(ca, key).start()
        stoppers.append(identity.stop)
        keyvault = KeyVaultStandIn(ca, key).start()
        stoppers.append(keyvault.stop)
        dovecot = Dovecot(directory / "dovecot", ca, key)
        dovecot.start()
        stoppers.append(dovecot.close)
        azurite = Azurite(directory / "azurite")
        azurite.start()
        stoppers.append(azurite.stop)
    except BaseException:
        stop()
        raise
    return Stack(ca, key, dovecot, azurite, identity, keyvault), stop


def env_file_text(stack: Stack, **overrides: str) -> str:
    """Shell assignments of the settings for ``stack`` (``.devstack/env``)."""
    values = {
        **stack.env(**overrides),
        **stack.azure_env(),
        "DEVSTACK_IMAP_HOST": stack.dovecot.host,
        "DEVSTACK_IMAP_PORT": str(stack.dovecot.port),
        "DEVSTACK_IMAP_SEED_USER": f"{c.MAILBOX}*{c.SEED_MASTER_USER}",
        "DEVSTACK_IMAP_SEED_PASSWORD": c.SEED_MASTER_PASSWORD,
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
