"""Every setting mail2blob reads, from the environment (Function App settings, local.settings.json,
or ``.devstack/env`` for the command line).

``Settings.from_env()`` validates all of them at once and raises one ``SettingsError`` naming every
setting that is missing or invalid, so a misconfigured deployment is fixed in one round.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .errors import SettingsError

PREFIX = "MAIL2BLOB_"

#: Delegated scope for Exchange Online IMAP. Graph-prefixed scopes give tokens IMAP rejects.
IMAP_SCOPE = "https://outlook.office365.com/IMAP.AccessAsUser.All"
#: App-only scope (client credentials, ``IMAP.AccessAsApp``).
IMAP_APP_SCOPE = "https://outlook.office365.com/.default"

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_SCHEDULE = "0 */5 * * * *"
DEFAULT_TIME_BUDGET_S = 1200  # 20 min: well inside host.json's 30 min functionTimeout.
#: delegated: a user's consented token (MSAL cache in Key Vault); app: client credentials
#: (IMAP.AccessAsApp), no consent and no token cache.
AUTH_MODES = ("delegated", "app")

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SECRET_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class PostAction:
    """What happens to a message in the mailbox once its blob is durably stored."""

    kind: str  # "keep" | "seen" | "move" | "delete"
    folder: str | None = None  # target folder for "move"

    @classmethod
    def parse(cls, text: str) -> PostAction:
        value = text.strip()
        lowered = value.lower()
        if lowered in ("keep", "seen", "delete"):
            return cls(lowered)
        if lowered.startswith("move:") and value[5:].strip():
            return cls("move", value[5:].strip())
        raise ValueError(f"{text!r} is not one of keep, seen, move:<folder>, delete")

    def __str__(self) -> str:
        return f"move:{self.folder}" if self.kind == "move" else self.kind


@dataclass(frozen=True)
class Settings:
    tenant_id: str
    client_id: str
    key_vault_url: str
    mailbox: str
    storage: str
    authority: str
    token_secret: str = "mail2blob-token-cache"  # noqa: S105 - a secret name, not a secret
    client_secret: str | None = field(default=None, repr=False)
    fic_client_id: str | None = None
    imap_host: str = "outlook.office365.com"
    imap_port: int = 993
    folders: tuple[str, ...] = ("INBOX",)
    container: str = "mail"
    after: PostAction = PostAction("keep")
    schedule: str = DEFAULT_SCHEDULE
    ca_bundle: str | None = None
    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    redirect_uri: str | None = None
    auth_mode: str = "delegated"

    @property
    def has_client_credential(self) -> bool:
        """A secret or a federated credential: a confidential client (app-only needs one)."""
        return bool(self.client_secret or self.fic_client_id)

    @property
    def storage_is_connection_string(self) -> bool:
        return "AccountName=" in self.storage or "UseDevelopmentStorage=" in self.storage

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        problems: list[str] = []

        def get(name: str) -> str | None:
            value = env.get(PREFIX + name)
            if value is None or not value.strip():
                return None
            return value.strip()

        def required(name: str, hint: str) -> str:
            value = get(name)
            if value is None:
                problems.append(f"{PREFIX}{name} is missing ({hint})")
                return ""
            return value

        tenant_id = required("TENANT_ID", "the Entra tenant id or domain of the mailbox")
        client_id = required("CLIENT_ID", "the app registration's application (client) id")
        key_vault_url = required("KEY_VAULT_URL", "e.g. https://<vault>.vault.azure.net")
        mailbox = required("MAILBOX", "the mailbox address to drain, e.g. invoices@contoso.com")
        storage = required("STORAGE", "a blob account URL or a storage connection string")

        if key_vault_url and not _is_https_url(key_vault_url):
            problems.append(f"{PREFIX}KEY_VAULT_URL must be an https:// URL, got {key_vault_url!r}")
        if mailbox and not _EMAIL.match(mailbox):
            problems.append(f"{PREFIX}MAILBOX must be an e-mail address, got {mailbox!r}")
        is_connection_string = "AccountName=" in storage or "UseDevelopmentStorage=" in storage
        if storage and not is_connection_string and not _is_url(storage):
            problems.append(
                f"{PREFIX}STORAGE must be https://<account>.blob.core.windows.net "
                "or a connection string"
            )

        authority = get("AUTHORITY") or f"{DEFAULT_AUTHORITY_HOST}/{tenant_id or '<tenant>'}"
        authority = authority.rstrip("/")
        if not _is_https_url(authority) or not urlparse(authority).path.strip("/"):
            problems.append(f"{PREFIX}AUTHORITY must be https://<host>/<tenant>, got {authority!r}")

        token_secret = get("TOKEN_SECRET") or "mail2blob-token-cache"
        if not _SECRET_NAME.match(token_secret):
            problems.append(
                f"{PREFIX}TOKEN_SECRET must be 1-127 letters, digits and dashes (a Key Vault "
                f"secret name), got {token_secret!r}"
            )

        imap_port = 993
        if (raw := get("IMAP_PORT")) is not None:
            if raw.isdigit() and 0 < int(raw) < 65536:
                imap_port = int(raw)
            else:
                problems.append(f"{PREFIX}IMAP_PORT must be a port number, got {raw!r}")

        folders = tuple(f.strip() for f in (get("FOLDERS") or "INBOX").split(",") if f.strip())
        if not folders:
            problems.append(f"{PREFIX}FOLDERS must name at least one folder")

        container = get("CONTAINER") or "mail"
        if not _CONTAINER.match(container):
            problems.append(
                f"{PREFIX}CONTAINER must be a blob container name (3-63 lowercase letters, digits "
                f"and single dashes), got {container!r}"
            )

        after = PostAction("keep")
        if (raw := get("AFTER")) is not None:
            try:
                after = PostAction.parse(raw)
            except ValueError as exc:
                problems.append(f"{PREFIX}AFTER: {exc}")
        if after.kind == "move" and after.folder in folders:
            problems.append(f"{PREFIX}AFTER moves into {after.folder!r}, which is also drained")

        schedule = get("SCHEDULE") or DEFAULT_SCHEDULE
        if len(schedule.split()) != 6:
            problems.append(
                f"{PREFIX}SCHEDULE must be a six-field NCRONTAB expression "
                f"(sec min hour day month weekday), got {schedule!r}"
            )

        ca_bundle = get("CA_BUNDLE")
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            problems.append(f"{PREFIX}CA_BUNDLE names no readable file: {ca_bundle!r}")

        time_budget_s: float = DEFAULT_TIME_BUDGET_S
        if (raw := get("TIME_BUDGET")) is not None:
            try:
                time_budget_s = float(raw)
                if time_budget_s <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"{PREFIX}TIME_BUDGET must be a positive number of seconds")

        redirect_uri = get("REDIRECT_URI")
        if redirect_uri is not None and not _is_url(redirect_uri):
            problems.append(f"{PREFIX}REDIRECT_URI must be an absolute URL, got {redirect_uri!r}")

        auth_mode = (get("AUTH_MODE") or "delegated").lower()
        if auth_mode not in AUTH_MODES:
            problems.append(f"{PREFIX}AUTH_MODE must be delegated or app, got {auth_mode!r}")
        elif auth_mode == "app" and not (get("CLIENT_SECRET") or get("FIC_CLIENT_ID")):
            problems.append(
                f"{PREFIX}AUTH_MODE app (client credentials) needs {PREFIX}CLIENT_SECRET or "
                f"{PREFIX}FIC_CLIENT_ID"
            )

        if problems:
            raise SettingsError(problems)
        return cls(
            tenant_id=tenant_id,
            client_id=client_id,
            key_vault_url=key_vault_url.rstrip("/"),
            mailbox=mailbox,
            storage=storage,
            authority=authority,
            token_secret=token_secret,
            client_secret=get("CLIENT_SECRET"),
            fic_client_id=get("FIC_CLIENT_ID"),
            imap_host=get("IMAP_HOST") or "outlook.office365.com",
            imap_port=imap_port,
            folders=folders,
            container=container,
            after=after,
            schedule=schedule,
            ca_bundle=ca_bundle,
            time_budget_s=time_budget_s,
            redirect_uri=redirect_uri,
            auth_mode=auth_mode,
        )


#: Every setting name the code reads; kept equal to local.settings.sample.json and the Bicep
#: (a test checks both).
SETTING_NAMES = frozenset(
    PREFIX + n
    for n in (
        "TENANT_ID",
        "CLIENT_ID",
        "CLIENT_SECRET",
        "FIC_CLIENT_ID",
        "AUTHORITY",
        "KEY_VAULT_URL",
        "TOKEN_SECRET",
        "MAILBOX",
        "IMAP_HOST",
        "IMAP_PORT",
        "FOLDERS",
        "STORAGE",
        "CONTAINER",
        "AFTER",
        "SCHEDULE",
        "CA_BUNDLE",
        "TIME_BUDGET",
        "REDIRECT_URI",
        "AUTH_MODE",
    )
)


def _is_url(text: str) -> bool:
    parsed = urlparse(text)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _is_https_url(text: str) -> bool:
    parsed = urlparse(text)
    return parsed.scheme == "https" and bool(parsed.netloc)
