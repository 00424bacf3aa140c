"""The source: a mailbox's folders, reached over IMAP with XOAUTH2 (imapclient).

Nothing here changes a message unless asked to (``mark_seen``/``move``/``delete``): bodies are read
with ``BODY.PEEK[]`` so fetching never sets ``\\Seen``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from .errors import LoginRefusedError, SourceError, SourceThrottledError
from .tokens import REFRESH_MARGIN_S, AccessToken

logger = logging.getLogger(__name__)

#: Exchange Online fails a FETCH of ~1,900+ messages at once; stay well below for metadata.
METADATA_CHUNK = 1000
_THROTTLED = re.compile(r"Request is throttled\. Suggested Backoff Time: (\d+) milliseconds", re.I)


@dataclass(frozen=True)
class FolderInfo:
    name: str
    uidvalidity: int
    exists: int


@dataclass
class Message:
    uid: int
    body: bytes
    internaldate: datetime  # timezone-aware, UTC
    flags: tuple[bytes, ...]
    size: int


def _utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _throttled_backoff(text: str) -> float | None:
    match = _THROTTLED.search(text)
    return int(match.group(1)) / 1000.0 if match else None


class ImapSource:
    """One authenticated IMAP connection to ``mailbox``, reconnecting with a fresh token when the
    current one is about to expire or the server ended the session (``BYE``)."""

    def __init__(
        self,
        host: str,
        port: int,
        mailbox: str,
        token_provider: Callable[..., AccessToken],
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.host = host
        self.port = port
        self.mailbox = mailbox
        self._token_provider = token_provider
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._timeout = timeout
        self._client: Any = None
        self._token: AccessToken | None = None
        self.capabilities: frozenset[bytes] = frozenset()
        self.reconnects = 0

    # -- connection -----------------------------------------------------------------------------

    def connect(self, *, force_refresh: bool = False) -> None:
        import imapclient

        self.close()
        token = self._token_provider(force_refresh=force_refresh)
        try:
            client = imapclient.IMAPClient(
                self.host,
                self.port,
                ssl=True,
                ssl_context=self._ssl_context,
                timeout=self._timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(
                f"cannot connect to IMAP server {self.host}:{self.port}: {exc}"
            ) from None
        except (OSError, imapclient.IMAPClient.Error) as exc:
            # Refused, reset, or closed before the greeting (a restarting server): retryable.
            raise SessionLostError(
                f"cannot connect to IMAP server {self.host}:{self.port}: {_text(exc)}"
            ) from None
        # imapclient sets imaplib's debug level to 5, which formats every literal for a debug
        # log even when logging is off: 4x slower fetches and twice the memory.
        client._imap.debug = 0
        client.normalise_times = False
        try:
            client.oauth2_login(self.mailbox, token.token)
        except imapclient.exceptions.LoginError as exc:
            _safe_logout(client)
            if isinstance(exc.__context__, imapclient.IMAPClient.AbortError | OSError):
                # imapclient turns a connection lost during AUTHENTICATE into a LoginError too
                raise SessionLostError(
                    f"IMAP connection to {self.host} lost during login: {_text(exc)}"
                ) from None
            raise LoginRefusedError(
                login_refused_message(self.mailbox, token.username, exc, app_only=token.app_only)
            ) from None
        except (imapclient.IMAPClient.Error, OSError) as exc:
            _safe_logout(client)
            text = _text(exc)
            if isinstance(exc, imapclient.IMAPClient.AbortError | OSError):
                raise SessionLostError(
                    f"IMAP connection to {self.host} lost during login: {text}"
                ) from None
            if "not connected" in text.lower():
                raise LoginRefusedError(
                    login_refused_message(
                        self.mailbox, token.username, exc, app_only=token.app_only
                    )
                ) from None
            raise SourceError(f"IMAP login to {self.host} failed: {text}") from None
        self._client = client
        self._token = token
        self.capabilities = frozenset(self._call(lambda c: c.capabilities(), "CAPABILITY"))
        logger.info("IMAP: logged in to %s as %s", self.host, self.mailbox)

    def ensure_connected(self) -> None:
        if self._client is None:
            self.connect()

    @property
    def token_expiring(self) -> bool:
        """The session's access token expires within the margin: reconnect with a fresh one
        before Exchange ends the session (``BYE ... AccessTokenExpired``)."""
        return self._token is not None and self._token.expires_within(REFRESH_MARGIN_S)

    def close(self) -> None:
        if self._client is not None:
            _safe_logout(self._client)
        self._client = None

    def __enter__(self) -> ImapSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def select(self, folder: str) -> FolderInfo:
        info = self._call(lambda c: c.select_folder(folder, readonly=False), f"SELECT {folder}")
        return FolderInfo(folder, int(info[b"UIDVALIDITY"]), int(info.get(b"EXISTS", 0)))

    def uids_after(self, last_uid: int, criteria: Sequence[Any] = ()) -> list[int]:
        """UIDs greater than ``last_uid``, ascending (``n:*`` also matches the highest UID),
        narrowed by extra SEARCH ``criteria`` (a source's filters: UNSEEN, SINCE, FROM...)."""
        query = ["UID", f"{last_uid + 1}:*", *criteria]
        charset = None if all(str(c).isascii() for c in criteria) else "UTF-8"
        uids = self._call(lambda c: c.search(query, charset=charset), "UID SEARCH")
        return sorted(u for u in uids if u > last_uid)

    def existing(self, uids: Iterable[int]) -> list[int]:
        """Which of ``uids`` still exist in the selected folder."""
        wanted = sorted(set(uids))
        if not wanted:
            return []
        found: list[int] = []
        for chunk in _chunks(wanted, METADATA_CHUNK):
            found.extend(self._call(lambda c, ch=chunk: c.search(["UID", _uid_set(ch)]), "SEARCH"))
        return sorted(set(found) & set(wanted))

    def sizes(self, uids: list[int]) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for chunk in _chunks(uids, METADATA_CHUNK):
            data = self._call(lambda c, ch=chunk: c.fetch(ch, ["RFC822.SIZE"]), "FETCH SIZE")
            sizes.update({uid: int(d.get(b"RFC822.SIZE", 0)) for uid, d in data.items()})
        return sizes

    def fetch(self, uids: list[int]) -> list[Message]:
        """Whole messages, byte for byte, without setting ``\\Seen``."""
        if not uids:
            return []
        data = self._call(
            lambda c: c.fetch(uids, ["BODY.PEEK[]", "INTERNALDATE", "RFC822.SIZE", "FLAGS"]),
            "FETCH",
        )
        messages = []
        for uid in uids:
            item = data.get(uid)
            if item is None or b"BODY[]" not in item:
                continue  # expunged meanwhile
            body = item[b"BODY[]"] or b""
            messages.append(
                Message(
                    uid=uid,
                    body=body,
                    internaldate=_utc(item.get(b"INTERNALDATE")),
                    flags=tuple(item.get(b"FLAGS", ())),
                    size=int(item.get(b"RFC822.SIZE", len(body))),
                )
            )
        return messages

    def fetch_into(self, uid: int, sink: IO[bytes], *, chunk_size: int) -> Message | None:
        """A large message in pieces (``BODY.PEEK[]<offset.length>``) written to ``sink``, so it
        is never held whole in memory. Returns the message without its body."""
        meta = self._call(
            lambda c: c.fetch([uid], ["INTERNALDATE", "RFC822.SIZE", "FLAGS"]), "FETCH META"
        ).get(uid)
        if meta is None:
            return None
        size = int(meta.get(b"RFC822.SIZE", 0))
        offset = 0
        while offset < size:
            part = f"BODY.PEEK[]<{offset}.{chunk_size}>"
            data = self._call(lambda c, p=part: c.fetch([uid], [p]), "FETCH PART").get(uid, {})
            piece = next((v for k, v in data.items() if k.startswith(b"BODY[]")), None)
            if not piece:
                break
            sink.write(piece)
            offset += len(piece)
        return Message(
            uid, b"", _utc(meta.get(b"INTERNALDATE")), tuple(meta.get(b"FLAGS", ())), size
        )

    # -- post-actions (only ever called for messages already stored) ----------------------------

    def mark_seen(self, uids: list[int]) -> None:
        if uids:
            self._call(lambda c: c.add_flags(uids, [b"\\Seen"], silent=True), "STORE +FLAGS")

    def move(self, uids: list[int], target: str) -> None:
        if not uids:
            return
        if b"MOVE" in self.capabilities:
            self._call(lambda c: c.move(uids, target), f"UID MOVE {target}")
            return
        self._call(lambda c: c.copy(uids, target), f"UID COPY {target}")
        self.delete(uids)

    def delete(self, uids: list[int]) -> None:
        if not uids:
            return
        self._call(lambda c: c.add_flags(uids, [b"\\Deleted"], silent=True), "STORE \\Deleted")
        if b"UIDPLUS" in self.capabilities:
            self._call(lambda c: c.uid_expunge(uids), "UID EXPUNGE")
        else:  # plain EXPUNGE would also remove messages someone else marked \Deleted
            raise SourceError(
                "the IMAP server lacks UIDPLUS, so mail2blob cannot expunge only its own messages"
            )

    def ensure_folder(self, name: str) -> None:
        if not self._call(lambda c: c.folder_exists(name), "LIST"):
            self._call(lambda c: c.create_folder(name), f"CREATE {name}")

    # -- plumbing -------------------------------------------------------------------------------

    def _call(self, operation: Callable[[Any], Any], what: str) -> Any:
        """Run one IMAP command, translating failures into typed errors."""
        import imapclient

        if self._client is None:
            self.connect()
        try:
            return operation(self._client)
        except imapclient.IMAPClient.AbortError as exc:
            self._client = None  # the session is gone (BYE, reset, token expired)
            raise SessionLostError(f"IMAP session ended during {what}: {_text(exc)}") from None
        except (OSError, ssl.SSLError) as exc:
            self._client = None
            raise SessionLostError(f"IMAP connection lost during {what}: {exc}") from None
        except imapclient.IMAPClient.Error as exc:
            text = _text(exc)
            backoff = _throttled_backoff(text)
            if backoff is not None:
                raise SourceThrottledError(f"{what}: Exchange Online throttled", backoff) from None
            raise SourceError(f"IMAP {what} failed: {text}") from None


class SessionLostError(SourceError):
    """The IMAP session ended (``BYE``, connection reset); reconnecting may fix it."""


def login_refused_message(
    mailbox: str, signed_in_as: str, exc: Exception, *, app_only: bool = False
) -> str:
    text = _text(exc)
    if app_only:
        return (
            f"the IMAP server refused the app-only XOAUTH2 login to {mailbox} ({signed_in_as}): "
            f"{text}. Likely causes: Exchange Online does not know the app's service principal "
            "(New-ServicePrincipal -AppId <client id> -ServiceId <object id of the enterprise "
            "application, not of the app registration>), or it has no FullAccess on the mailbox "
            f"(Add-MailboxPermission -Identity {mailbox} -User <that object id> -AccessRights "
            "FullAccess), or IMAP.AccessAsApp lacks admin consent, or IMAP is disabled for "
            "the mailbox"
        )
    who = f"the token belongs to {signed_in_as}" if signed_in_as else "the token's account"
    causes = [
        "IMAP is disabled for the mailbox (Exchange admin center > mailbox > Manage email apps > "
        "IMAP), or",
        "the token was issued for another resource than Exchange Online "
        "(scope must be https://outlook.office365.com/IMAP.AccessAsUser.All), or",
    ]
    if signed_in_as and signed_in_as.lower() != mailbox.lower():
        causes.append(
            f"{signed_in_as} has no Full Access permission on {mailbox} "
            "(Add-MailboxPermission), or the wrong account signed in"
        )
    else:
        causes.append("the token expired or was revoked")
    return (
        f"the IMAP server refused XOAUTH2 login to {mailbox} ({who}): {text}. Likely causes: "
        + " ".join(causes)
    )


def _text(exc: Exception) -> str:
    parts = []
    for arg in exc.args:
        parts.append(arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg))
    return " ".join(parts) or type(exc).__name__


def _safe_logout(client: Any) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - best effort on a connection we are abandoning
        with contextlib.suppress(Exception):
            client.shutdown()


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _uid_set(uids: list[int]) -> str:
    return ",".join(str(u) for u in uids)
