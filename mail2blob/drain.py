"""The drain loop: every message of the source's folders stored exactly once in the destination.

Order of events for each batch, which is what makes a crash anywhere safe:

1. fetch the batch (``BODY.PEEK[]``: nothing is marked);
2. upload each message with a conditional PUT (content-addressed name, ``overwrite=False``);
3. the post-action (seen / move / delete) on the messages that are now stored, and only on those;
4. the checkpoint moves past the batch (failed messages are recorded and retried next run).

A crash before 4 makes the next run fetch the batch again; its uploads answer "already present",
and the post-action is repeated (all of them are idempotent). While batch *n* uploads, batch *n+1*
is being fetched, so the IMAP connection stays busy.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from .blob_destination import (
    BlobDestination,
    Outcome,
    StoredBlob,
    Uploads,
    ascii_safe,
    blob_name,
    message_metadata,
    sha256_hex,
)
from .checkpoint import CheckpointStore, FolderState, MailboxLease, MailboxState
from .errors import (
    DestinationError,
    Mail2BlobError,
    SourceError,
    SourceThrottledError,
    azure_reason,
)
from .imap_source import ImapSource, Message, SessionLostError
from .settings import PostAction, Settings

if TYPE_CHECKING:
    from .sources import Source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainOptions:
    folders: tuple[str, ...] = ("INBOX",)
    after: PostAction = field(default_factory=lambda: PostAction("keep"))
    time_budget_s: float = 1200.0
    batch_messages: int = 200
    batch_bytes: int = 16 * 1024 * 1024
    #: Messages above this are fetched in pieces into a spool file, never held whole.
    large_message_bytes: int = 8 * 1024 * 1024
    chunk_bytes: int = 4 * 1024 * 1024
    #: Uploads in flight; ``None``: the destination's default (``IN_FLIGHT``).
    upload_concurrency: int | None = None
    imap_attempts: int = 4
    max_backoff_s: float = 60.0
    #: Blob names start with this (a source's prefix); ``None``: the mailbox address.
    blob_prefix: str | None = None
    #: Extra IMAP SEARCH criteria combined with the UID range (a source's filters).
    search: tuple[Any, ...] = ()


@dataclass
class FailedMessage:
    folder: str
    uid: int
    reason: str


@dataclass
class FolderResult:
    stored: int = 0
    already_present: int = 0
    failed: int = 0
    backlog: int = 0
    uidvalidity: int = 0
    last_uid: int = 0


@dataclass
class DrainResult:
    mailbox: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    stored: int = 0
    already_present: int = 0
    failed: list[FailedMessage] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    backlog: int = 0
    complete: bool = False
    error: str | None = None
    error_kind: str | None = None
    folders: dict[str, FolderResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["seconds"] = round(self.seconds, 3)
        return data

    def summary(self) -> str:
        state = "complete" if self.complete else f"partial, backlog {self.backlog}"
        text = (
            f"{self.mailbox}: stored {self.stored}, already present {self.already_present}, "
            f"failed {len(self.failed)}, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
            f"({state})"
        )
        return text + (f"; error: {self.error}" if self.error else "")


@dataclass
class _Fetched:
    message: Message
    data: bytes | IO[bytes]
    sha256: str


@dataclass
class _Batch:
    folder: str
    uids: list[int]
    items: list[_Fetched]
    uploads: list[Future[StoredBlob]]


Progress = Callable[[DrainResult], None]


class Drain:
    """One drain run of one mailbox. The clients come in as parameters (function, CLI, tests)."""

    def __init__(
        self,
        *,
        mailbox: str,
        source: ImapSource,
        destination: BlobDestination,
        checkpoint: CheckpointStore,
        lease: MailboxLease | None,
        options: DrainOptions,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        progress: Progress | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.source = source
        self.destination = destination
        self.checkpoint = checkpoint
        self.lease = lease
        self.options = options
        self._clock = clock
        self._sleep = sleep
        self._progress = progress
        self._deadline = 0.0
        self._expected_uidvalidity = 0
        self.result = DrainResult(mailbox)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> DrainResult:
        """Drain every folder within the time budget. Never raises for a failure of the run
        itself: the result says what happened (``error``); settings/consent errors come earlier."""
        start = self._clock()
        self._deadline = start + self.options.time_budget_s
        try:
            # Token and login first: when consent is needed, nothing anywhere changes.
            self._imap("", self.source.ensure_connected, select=False)  # with retries
            self.destination.ensure_container()
            if self.lease:
                self.lease.acquire()
            state = self.checkpoint.load()  # after the lease: nobody else writes it now
            if self.options.after.kind == "move":
                self.source.ensure_folder(self.options.after.folder or "")
            with self.destination.uploads(self.options.upload_concurrency) as uploads:
                for index, folder in enumerate(self.options.folders):
                    if self._out_of_time():
                        self._count_backlog(self.options.folders[index:], state)
                        break
                    self._drain_folder(folder, state, uploads)
                else:
                    self.result.complete = self.result.backlog == 0
        except Mail2BlobError as exc:
            self.result.error = str(exc)
            self.result.error_kind = type(exc).__name__
            logger.error("drain of %s stopped: %s", self.mailbox, exc)
        finally:
            self.result.seconds = self._clock() - start
            self.source.close()
            if self.lease:
                self.lease.release()
        return self.result

    def _drain_folder(self, folder: str, state: MailboxState, uploads: Uploads) -> None:
        info = self._imap(folder, lambda: self.source.select(folder), select=False)
        fstate = state.folder(folder)
        loaded = copy.deepcopy(fstate)
        fresult = self.result.folders.setdefault(folder, FolderResult())
        if fstate.uidvalidity != info.uidvalidity:
            if fstate.uidvalidity:
                logger.warning(
                    "%s/%s: UIDVALIDITY changed %s -> %s; re-reading the folder (messages "
                    "already stored are recognised by content and not stored again)",
                    self.mailbox,
                    folder,
                    fstate.uidvalidity,
                    info.uidvalidity,
                )
            state.folders[folder] = fstate = FolderState(uidvalidity=info.uidvalidity)
        self._expected_uidvalidity = info.uidvalidity
        fresult.uidvalidity = info.uidvalidity

        new = self._imap(
            folder, lambda: self.source.uids_after(fstate.last_uid, self.options.search)
        )
        retry = self._imap(folder, lambda: self.source.existing(int(u) for u in fstate.failed))
        for gone in set(fstate.failed) - {str(u) for u in retry}:
            logger.info("%s/%s: failed message uid %s no longer exists", self.mailbox, folder, gone)
            del fstate.failed[gone]
        todo = sorted(set(new) | set(retry))
        if not todo and state.folders.get(folder) != loaded:
            self.checkpoint.save(state)  # a new UIDVALIDITY or pruned failures, with no batch
        sizes = self._imap(folder, lambda: self.source.sizes(todo)) if todo else {}
        logger.info("%s/%s: %d messages to drain", self.mailbox, folder, len(todo))

        pending: _Batch | None = None
        remaining = list(todo)
        for uids in self._plan(todo, sizes):
            if self._out_of_time():
                break
            if self.lease:
                self.lease.check()
            if self.source.token_expiring:
                logger.info("IMAP access token expires soon; reconnecting with a fresh one")
                self._imap(folder, lambda: None, reconnect=False)
            batch = self._fetch_and_upload(folder, uids, sizes, uploads)
            if pending:
                self._finish(pending, state)
            pending = batch
            remaining = remaining[len(uids) :]
        if pending:
            self._finish(pending, state)
        fresult.backlog = len(remaining)
        fresult.last_uid = fstate.last_uid
        self.result.backlog += len(remaining)

    def _plan(self, uids: list[int], sizes: dict[int, int]) -> Iterator[list[int]]:
        """Batches bounded in count and bytes; a large message is a batch of its own."""
        batch: list[int] = []
        batch_bytes = 0
        for uid in uids:
            size = sizes.get(uid, 0)
            if size > self.options.large_message_bytes:
                if batch:
                    yield batch
                    batch, batch_bytes = [], 0
                yield [uid]
                continue
            if batch and (
                len(batch) >= self.options.batch_messages
                or batch_bytes + size > self.options.batch_bytes
            ):
                yield batch
                batch, batch_bytes = [], 0
            batch.append(uid)
            batch_bytes += size
        if batch:
            yield batch

    def _fetch_and_upload(
        self, folder: str, uids: list[int], sizes: dict[int, int], uploads: Uploads
    ) -> _Batch:
        if len(uids) == 1 and sizes.get(uids[0], 0) > self.options.large_message_bytes:
            items = self._fetch_large(folder, uids[0])
        else:
            messages = self._imap(folder, lambda: self.source.fetch(uids))
            items = [_Fetched(m, m.body, sha256_hex(m.body)) for m in messages]
        futures = [self._store(uploads, folder, item) for item in items]
        return _Batch(folder, uids, items, futures)

    def _fetch_large(self, folder: str, uid: int) -> list[_Fetched]:
        spool = tempfile.SpooledTemporaryFile(max_size=self.options.chunk_bytes)  # noqa: SIM115
        hashing = _HashingWriter(spool)

        def fetch() -> Message | None:
            spool.seek(0)
            spool.truncate()
            hashing.reset()
            return self.source.fetch_into(uid, hashing, chunk_size=self.options.chunk_bytes)

        message = self._imap(folder, fetch)
        if message is None:
            spool.close()
            return []
        spool.seek(0)
        return [_Fetched(message, spool, hashing.hexdigest())]

    def _store(self, uploads: Uploads, folder: str, item: _Fetched) -> Future[StoredBlob]:
        try:
            name, length, metadata = self._describe(folder, item)
        except Exception as exc:  # noqa: BLE001 - recorded as the message's failure
            failed: Future[StoredBlob] = Future()
            failed.set_exception(exc)
            return failed
        return uploads.submit(name, item.data, length=length, metadata=metadata)

    def _describe(self, folder: str, item: _Fetched) -> tuple[str, int, dict[str, str]]:
        """The blob's name, length and metadata."""
        message = item.message
        data = item.data
        if isinstance(data, bytes):
            length = len(data)
            metadata = message_metadata(data)
        else:
            head = data.read(256 * 1024)
            data.seek(0, 2)
            length = data.tell()
            data.seek(0)
            metadata = message_metadata(head)
        metadata.update(
            size=str(length),
            sha256=item.sha256,
            internaldate=message.internaldate.isoformat(),
            folder=ascii_safe(folder),
            uid=str(message.uid),
            uidvalidity=str(self._expected_uidvalidity),
        )
        prefix = self.options.blob_prefix or self.mailbox
        name = blob_name(prefix, folder, message.internaldate, item.sha256)
        return name, length, metadata

    def _finish(self, batch: _Batch, state: MailboxState) -> None:
        """Wait for the batch's uploads, post-action what is stored, then checkpoint."""
        folder = batch.folder
        fstate = state.folder(folder)
        fresult = self.result.folders[folder]
        stored_uids: list[int] = []
        transport_failure: str | None = None
        for item, future in zip(batch.items, batch.uploads, strict=True):
            uid = item.message.uid
            try:
                blob = future.result()
            except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
                reason = azure_reason(exc)
                entry = fstate.failed.get(str(uid), {"attempts": 0})
                fstate.failed[str(uid)] = {"reason": reason, "attempts": entry["attempts"] + 1}
                self.result.failed.append(FailedMessage(folder, uid, reason))
                fresult.failed += 1
                logger.error("%s/%s uid %s not stored: %s", self.mailbox, folder, uid, reason)
                if _is_transport_error(exc):
                    transport_failure = reason
                continue
            finally:
                if not isinstance(item.data, bytes):
                    item.data.close()
            stored_uids.append(uid)
            fstate.failed.pop(str(uid), None)
            if blob.outcome is Outcome.STORED:
                self.result.stored += 1
                fresult.stored += 1
                self.result.bytes += blob.size
            else:
                self.result.already_present += 1
                fresult.already_present += 1
        self._post_action(folder, stored_uids)
        fstate.last_uid = max(fstate.last_uid, *batch.uids)
        self.checkpoint.save(state)
        if self._progress:
            self._progress(self.result)
        if transport_failure:
            raise DestinationError(f"blob storage unreachable: {transport_failure}")

    def _post_action(self, folder: str, uids: list[int]) -> None:
        after = self.options.after
        if not uids or after.kind == "keep":
            return
        if after.kind == "seen":
            self._imap(folder, lambda: self.source.mark_seen(uids))
        elif after.kind == "move":
            self._imap(folder, lambda: self.source.move(uids, after.folder or ""))
        elif after.kind == "delete":
            self._imap(folder, lambda: self.source.delete(uids))

    # -- resilience -----------------------------------------------------------------------------

    def _imap(
        self,
        folder: str,
        operation: Callable[[], Any],
        *,
        select: bool = True,
        reconnect: bool | None = None,
    ) -> Any:
        """Run an IMAP step, reconnecting after a lost session and backing off when throttled,
        within the attempts. A failed reconnect counts as an attempt and is retried too (a
        restarting server refuses connections for a moment). ``reconnect``: start with a new
        session (``True``: with a freshly refreshed token); every reconnect re-selects
        ``folder`` and checks its UIDVALIDITY."""
        attempt = 0
        while True:
            attempt += 1
            try:
                if reconnect is not None:
                    self.source.connect(force_refresh=reconnect)
                    self.source.reconnects += 1
                    if select:
                        self._reselect(folder)
                    reconnect = None
                return operation()
            except SessionLostError as exc:
                if attempt >= self.options.imap_attempts:
                    raise
                logger.warning("%s; reconnecting (attempt %d)", exc, attempt)
                self._sleep(min(2 ** (attempt - 1) * 0.5, self.options.max_backoff_s))
                reconnect = bool(reconnect) or "TokenExpired" in str(exc)
            except SourceThrottledError as exc:
                if attempt >= self.options.imap_attempts:
                    raise
                backoff = min(exc.backoff_seconds, self.options.max_backoff_s)
                logger.warning("Exchange Online throttled %s; backing off %.1f s", folder, backoff)
                self._sleep(backoff)

    def _reselect(self, folder: str) -> None:
        info = self.source.select(folder)
        if info.uidvalidity != self._expected_uidvalidity:
            raise SourceError(
                f"UIDVALIDITY of {folder} changed during the run; the next run re-reads it"
            )

    def _out_of_time(self) -> bool:
        return self._clock() >= self._deadline

    def _count_backlog(self, folders: tuple[str, ...], state: MailboxState) -> None:
        for folder in folders:
            try:
                info = self.source.select(folder)
                fstate = state.folder(folder)
                last = fstate.last_uid if fstate.uidvalidity == info.uidvalidity else 0
                count = len(self.source.uids_after(last, self.options.search))
            except SourceError as exc:
                logger.info("backlog of %s unknown: %s", folder, exc)
                continue
            self.result.folders.setdefault(folder, FolderResult()).backlog = count
            self.result.backlog += count


class _HashingWriter:
    """Writes through to a file while hashing, so a spooled message gets its name on the fly."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self.reset()

    def reset(self) -> None:
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        return self._sink.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _is_transport_error(exc: BaseException) -> bool:
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    return isinstance(exc, ServiceRequestError | ServiceResponseError)


def drain_mailbox(
    settings: Settings, *, progress: Progress | None = None, source: Source | None = None
) -> DrainResult:
    """One drain of ``source`` (default: the one source the ``MAIL2BLOB_*`` settings describe)
    with clients built from ``settings``: the entry point of the queue function and
    ``python -m mail2blob drain``."""
    from . import clients
    from .sources import default_source

    source = source or default_source(settings)
    settings = source.settings(settings)
    destination = clients.blob_destination(settings)
    drain = Drain(
        mailbox=settings.mailbox,
        source=clients.imap_source(settings),
        destination=destination,
        checkpoint=CheckpointStore(destination.container, source.state_key),
        lease=MailboxLease(destination.container, source.state_key),
        options=DrainOptions(
            folders=settings.folders,
            after=settings.after,
            time_budget_s=settings.time_budget_s,
            blob_prefix=source.blob_prefix,
            search=source.filters.criteria(),
        ),
        progress=progress,
    )
    return drain.run()
