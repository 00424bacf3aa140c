"""Sources: which mailboxes mail2blob drains, and how.

The list lives in the archive container as the blob ``.mail2blob/sources.json``, so an admin
changes it with Storage Explorer or ``az storage blob upload`` and the next timer tick uses it,
without a redeploy::

    {"sources": [
      {"id": "invoices", "mailbox": "invoices@contoso.com", "folders": ["INBOX"],
       "auth": "delegated", "after": "move:Archived",
       "filters": {"unseen": true, "since": "2026-01-01", "from": "billing", "subject": "invoice"},
       "prefix": "invoices", "token_secret": "mail2blob-token-invoices", "enabled": true}
    ]}

Only ``id`` and ``mailbox`` are required. Without that blob the ``MAIL2BLOB_*`` settings describe
the one source, ``default``, exactly as before sources existed: same blob names, checkpoint, lease
and token secret. The document is validated as a whole; one ``SourcesError`` lists every problem
with the source id and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from .blob_destination import STATE_PREFIX
from .errors import DestinationError, SettingsError
from .settings import _EMAIL, _SECRET_NAME, AUTH_MODES, PREFIX, PostAction, Settings

logger = logging.getLogger(__name__)

SOURCES_BLOB = f"{STATE_PREFIX}sources.json"
DEFAULT_SOURCE_ID = "default"
#: Token secret of a source in sources.json that names none: ``mail2blob-token-<id>``.
TOKEN_SECRET_PREFIX = "mail2blob-token-"  # noqa: S105 - a secret name, not a secret

_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_FILTER_TEXT_MAX = 200
_PREFIX_MAX = 512
_SOURCE_KEYS = frozenset(
    {"id", "mailbox", "folders", "auth", "after", "filters", "prefix", "token_secret", "enabled"}
)
_FILTER_KEYS = frozenset({"unseen", "since", "from", "subject"})


class SourcesError(SettingsError):
    """``.mail2blob/sources.json`` is unreadable or invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        self.args = (f"{SOURCES_BLOB} is not valid:\n{lines}",)

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Filters:
    """Server-side IMAP SEARCH criteria, combined (AND) with the UID range of the drain.

    A message is judged when the drain first reaches it: one that does not match then is passed
    over for good once a later message is stored (the checkpoint moves past it)."""

    unseen: bool = False
    since: date | None = None
    from_: str | None = None
    subject: str | None = None

    def criteria(self) -> tuple[str | date, ...]:
        """The criteria for ``UID SEARCH`` (imapclient quotes the strings)."""
        items: list[str | date] = []
        if self.unseen:
            items.append("UNSEEN")
        if self.since is not None:
            items += ["SINCE", self.since]
        if self.from_:
            items += ["FROM", self.from_]
        if self.subject:
            items += ["SUBJECT", self.subject]
        return tuple(items)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.unseen:
            data["unseen"] = True
        if self.since is not None:
            data["since"] = self.since.isoformat()
        if self.from_:
            data["from"] = self.from_
        if self.subject:
            data["subject"] = self.subject
        return data


@dataclass(frozen=True)
class Source:
    """One mailbox definition: what to drain, how to sign in, what to do afterwards."""

    id: str
    mailbox: str
    folders: tuple[str, ...] = ("INBOX",)
    auth: str = "delegated"
    after: PostAction = field(default_factory=lambda: PostAction("keep"))
    filters: Filters = field(default_factory=Filters)
    prefix: str = ""  # blob name prefix; empty means the mailbox address
    token_secret: str = ""
    enabled: bool = True

    @property
    def blob_prefix(self) -> str:
        return self.prefix or self.mailbox

    @property
    def state_key(self) -> str:
        """Names the source's checkpoint and lease blobs. The ``default`` source keeps the
        mailbox-keyed names it had before sources existed; ids cannot contain ``@``, so the two
        never collide."""
        return self.mailbox if self.id == DEFAULT_SOURCE_ID else self.id

    def settings(self, base: Settings) -> Settings:
        """``base`` narrowed to this source: what clients, tokens and the drain read."""
        return dataclasses.replace(
            base,
            mailbox=self.mailbox,
            folders=self.folders,
            after=self.after,
            token_secret=self.token_secret or base.token_secret,
            auth_mode=self.auth,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mailbox": self.mailbox,
            "folders": list(self.folders),
            "auth": self.auth,
            "after": str(self.after),
            "filters": self.filters.to_dict(),
            "prefix": self.blob_prefix,
            "token_secret": self.token_secret if self.auth == "delegated" else None,
            "enabled": self.enabled,
        }


@dataclass(frozen=True)
class SourceSet:
    sources: tuple[Source, ...]
    origin: str  # "settings" or the blob name

    @property
    def enabled(self) -> tuple[Source, ...]:
        return tuple(s for s in self.sources if s.enabled)

    def get(self, source_id: str) -> Source | None:
        return next((s for s in self.sources if s.id == source_id), None)

    def for_mailbox(self, mailbox: str) -> tuple[Source, ...]:
        """The sources that drain ``mailbox`` (the consent link's ``?mailbox=``)."""
        return tuple(s for s in self.sources if s.mailbox.lower() == mailbox.lower())


def default_source(settings: Settings) -> Source:
    """The one source the ``MAIL2BLOB_*`` settings describe."""
    return Source(
        id=DEFAULT_SOURCE_ID,
        mailbox=settings.mailbox,
        folders=settings.folders,
        auth=settings.auth_mode,
        after=settings.after,
        token_secret=settings.token_secret,
    )


def load_sources(settings: Settings, container: Any = None) -> SourceSet:
    """The sources from ``.mail2blob/sources.json`` in the archive container, or the one
    ``default`` source from the settings when that blob does not exist."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    if container is None:
        from . import clients

        container = clients.container_client(settings)
    try:
        data = container.download_blob(SOURCES_BLOB).readall()
    except ResourceNotFoundError:
        return SourceSet((default_source(settings),), "settings")
    except AzureError as exc:
        raise DestinationError(f"cannot read {SOURCES_BLOB}: {type(exc).__name__}") from None
    return SourceSet(parse_sources(data, settings), SOURCES_BLOB)


def parse_sources(data: bytes | str, settings: Settings) -> tuple[Source, ...]:
    """Parse and validate a sources document; raises one ``SourcesError`` naming every problem."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourcesError([f"not JSON: {exc}"]) from None
    if not isinstance(document, dict) or not isinstance(document.get("sources"), list):
        raise SourcesError(['the document must be an object {"sources": [ ... ]}'])
    problems: list[str] = []
    unknown = [k for k in document if k != "sources" and not _is_comment(k)]
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (only 'sources')")
    raw_sources = document["sources"]
    if not raw_sources:
        problems.append("'sources' is empty: list at least one source (disable with enabled)")
    sources: list[Source] = []
    seen_ids: set[str] = set()
    for index, raw in enumerate(raw_sources):
        source = _parse_source(raw, index, settings, problems)
        if source is None:
            continue
        if source.id in seen_ids:
            problems.append(f"source {source.id!r}: id: used by more than one source")
        seen_ids.add(source.id)
        sources.append(source)
    if problems:
        raise SourcesError(problems)
    return tuple(sources)


def _is_comment(key: str) -> bool:
    return key.startswith(("_", "$")) or key == "comment"


def _parse_source(raw: Any, index: int, settings: Settings, problems: list[str]) -> Source | None:
    if not isinstance(raw, dict):
        problems.append(f"source #{index + 1}: must be an object")
        return None
    raw_id = raw.get("id")
    label = f"source {raw_id!r}" if isinstance(raw_id, str) and raw_id else f"source #{index + 1}"
    start = len(problems)

    def problem(name: str, text: str) -> None:
        problems.append(f"{label}: {name}: {text}")

    unknown = sorted(k for k in raw if k not in _SOURCE_KEYS and not _is_comment(k))
    for key in unknown:
        problem(key, f"unknown field (known: {', '.join(sorted(_SOURCE_KEYS))})")

    source_id = raw_id if isinstance(raw_id, str) else ""
    if not source_id:
        problem("id", "required (lowercase letters, digits and dashes)")
    elif not _ID.match(source_id):
        problem("id", f"must be 1-63 lowercase letters, digits and inner dashes, got {raw_id!r}")

    mailbox = raw.get("mailbox")
    if not isinstance(mailbox, str) or not _EMAIL.match(mailbox.strip()):
        problem("mailbox", f"required, an e-mail address, got {mailbox!r}")
        mailbox = ""
    mailbox = mailbox.strip()

    folders = _folders(raw.get("folders", ["INBOX"]), problem)
    auth = _choice(raw.get("auth", "delegated"), AUTH_MODES, "auth", problem)
    if auth == "app" and not settings.has_client_credential:
        problem(
            "auth",
            f"app (client credentials) needs {PREFIX}CLIENT_SECRET or {PREFIX}FIC_CLIENT_ID",
        )

    after = PostAction("keep")
    raw_after = raw.get("after", "keep")
    if not isinstance(raw_after, str):
        problem("after", f"must be keep, seen, move:<folder> or delete, got {raw_after!r}")
    else:
        try:
            after = PostAction.parse(raw_after)
        except ValueError as exc:
            problem("after", str(exc))
    if after.kind == "move" and after.folder in folders:
        problem("after", f"moves into {after.folder!r}, which is also drained")

    filters = _filters(raw.get("filters", {}), problem)
    prefix = _prefix(raw.get("prefix"), problem)

    # The default derives from the id: a bad id is reported once, not again here.
    default_secret = f"{TOKEN_SECRET_PREFIX}{source_id if _ID.match(source_id) else 'x'}"
    token_secret = raw.get("token_secret", default_secret)
    if not isinstance(token_secret, str) or not _SECRET_NAME.match(token_secret):
        problem(
            "token_secret",
            "must be a Key Vault secret name (1-127 letters, digits and dashes), "
            f"got {token_secret!r}",
        )
        token_secret = ""

    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        problem("enabled", f"must be true or false, got {enabled!r}")

    if len(problems) > start:
        return None
    return Source(
        id=source_id,
        mailbox=mailbox,
        folders=folders,
        auth=auth,
        after=after,
        filters=filters,
        prefix=prefix,
        token_secret=token_secret,
        enabled=enabled,
    )


def _folders(value: Any, problem: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(f, str) and f.strip() for f in value)
    ):
        problem("folders", f"must be a non-empty list of folder names, got {value!r}")
        return ("INBOX",)
    folders = tuple(f.strip() for f in value)
    if len(set(folders)) != len(folders):
        problem("folders", "names a folder twice")
    return folders


def _choice(value: Any, allowed: tuple[str, ...], name: str, problem: Any) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        problem(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        return allowed[0]
    return value.lower()


def _filters(value: Any, problem: Any) -> Filters:
    if not isinstance(value, dict):
        problem("filters", f'must be an object like {{"unseen": true}}, got {value!r}')
        return Filters()
    for key in sorted(set(value) - _FILTER_KEYS):
        problem(f"filters.{key}", f"unknown filter (known: {', '.join(sorted(_FILTER_KEYS))})")
    unseen = value.get("unseen", False)
    if not isinstance(unseen, bool):
        problem("filters.unseen", f"must be true or false, got {unseen!r}")
        unseen = False
    since = None
    if (raw := value.get("since")) is not None:
        try:
            since = date.fromisoformat(raw) if isinstance(raw, str) and len(raw) == 10 else None
        except ValueError:
            since = None
        if since is None:
            problem("filters.since", f"must be a date YYYY-MM-DD, got {raw!r}")
    return Filters(
        unseen=unseen,
        since=since,
        from_=_filter_text(value.get("from"), "filters.from", problem),
        subject=_filter_text(value.get("subject"), "filters.subject", problem),
    )


def _filter_text(value: Any, name: str, problem: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > _FILTER_TEXT_MAX
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in value)
    ):
        problem(name, f"must be non-empty text on one line, at most {_FILTER_TEXT_MAX} characters")
        return None
    return value.strip()


def _prefix(value: Any, problem: Any) -> str:
    """A blob name prefix: ``/``-separated segments, none empty or ``.``/``..``, not inside
    mail2blob's own ``.mail2blob/`` state."""
    if value is None:
        return ""
    if not isinstance(value, str) or not value.strip("/") or len(value) > _PREFIX_MAX:
        problem("prefix", f"must be a non-empty blob name prefix, got {value!r}")
        return ""
    segments = value.strip("/").split("/")
    if any(s in ("", ".", "..") for s in segments) or any(ord(ch) < 32 for ch in value):
        problem("prefix", f"segments must be non-empty and not '.' or '..', got {value!r}")
        return ""
    if segments[0] == STATE_PREFIX.rstrip("/"):
        problem("prefix", f"must not be inside {STATE_PREFIX} (mail2blob's own state)")
        return ""
    return "/".join(segments)
