"""Many sources: one drain per source, fanned out over an Azure Storage queue.

On Azure Functions the timer puts one message per enabled source on ``mail2blob-drain``
(:func:`tick_messages`); a queue-triggered function drains that one source
(:func:`handle_message`). What happens to a message:

- the source drained (completely or up to the time budget): done;
- another worker holds the source's lease (:class:`~mail2blob.errors.DrainBusyError`): that worker
  is draining it, so this one logs and returns; no retry;
- consent is needed: one stable log line ``MAIL2BLOB_CONSENT_FAILED source=... mailbox=...
  aadsts=...`` (what the Application Insights alert matches) and no retry, since retrying
  cannot fix it;
- any other failure raises :class:`DrainFailed`, so the Functions host retries the message after
  ``visibilityTimeout``; on the last attempt (``dequeue_count >= maxDequeueCount`` of host.json)
  it returns a poison record ``{"source", "reason", "message"}`` instead, which the function
  writes to ``mail2blob-drain-poison``, so the poison message says why.

Every finished run is also recorded per source in ``.mail2blob/runs/<source>.json`` (last run,
last error with its AADSTS code, totals): what the status page shows, even for runs that failed
before the checkpoint was touched. The command line drains the sources one after another
(:func:`drain_sources`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import aadsts
from .blob_destination import STATE_PREFIX
from .errors import (
    ConsentNeededError,
    DrainBusyError,
    Mail2BlobError,
    SettingsError,
    azure_reason,
)
from .settings import Settings
from .sources import Source, SourceSet, load_sources

if TYPE_CHECKING:
    from .drain import DrainResult, Progress

logger = logging.getLogger(__name__)

#: Queue of drain requests (one message per source per tick) and where unprocessable ones go.
#: The Functions host's own poison queue for ``mail2blob-drain`` has the same name.
QUEUE_NAME = "mail2blob-drain"
POISON_QUEUE_NAME = "mail2blob-drain-poison"
#: The stable start of the log line for a dead or failing consent (the alert's query).
CONSENT_EVENT = "MAIL2BLOB_CONSENT_FAILED"
POISON_EVENT = "MAIL2BLOB_DRAIN_POISONED"
RUNS_PREFIX = f"{STATE_PREFIX}runs/"
#: The Functions host's default when host.json does not set maxDequeueCount.
HOST_DEFAULT_MAX_DEQUEUE_COUNT = 5


class DrainFailed(RuntimeError):
    """Raised so the Functions host records the invocation as failed (and retries a queue
    message)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- one source ------------------------------------------------------------------------------


@dataclass
class SourceRun:
    """The outcome of draining one source."""

    source: Source
    result: DrainResult

    @property
    def outcome(self) -> str:
        """ok, busy, consent_needed or failed."""
        if self.result.ok:
            return "ok"
        return {
            DrainBusyError.__name__: "busy",
            ConsentNeededError.__name__: "consent_needed",
        }.get(self.result.error_kind or "", "failed")

    @property
    def aadsts(self) -> str | None:
        return aadsts.code_in(self.result.error or "")

    @property
    def reason(self) -> str:
        """Why the run failed, in one line (the error, or the first message that failed)."""
        if self.result.error:
            return f"{self.result.error_kind}: {self.result.error}"
        if self.result.failed:
            first = self.result.failed[0]
            return (
                f"{len(self.result.failed)} messages not stored; first: {first.folder} uid "
                f"{first.uid}: {first.reason}"
            )
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.id,
            **self.result.to_dict(),
            "outcome": self.outcome,
            "aadsts": self.aadsts,
        }


def run_source(
    settings: Settings, source: Source, *, progress: Progress | None = None, container: Any = None
) -> SourceRun:
    """Drain one source, log a consent failure as the stable event and record the run."""
    from . import clients
    from .drain import drain_mailbox

    run = SourceRun(source, drain_mailbox(settings, source=source, progress=progress))
    if run.outcome == "consent_needed":
        log_consent_failure(source, run.aadsts)
    if run.outcome != "busy":  # the run holding the lease records its own result
        RunLog(container or clients.container_client(settings), source).record(run)
    return run


def log_consent_failure(source: Source, aadsts: str | None) -> None:
    """ONE line, queryable as text: Functions sends a log record's message to Application
    Insights ``traces.message``; ``extra`` fields do not arrive."""
    logger.error(
        "%s source=%s mailbox=%s aadsts=%s auth=%s",
        CONSENT_EVENT,
        source.id,
        source.mailbox,
        aadsts or "none",
        source.auth,
    )


def drain_sources(
    settings: Settings,
    *,
    source_id: str | None = None,
    progress: Callable[[Source], Progress | None] | None = None,
) -> list[SourceRun]:
    """Drain every enabled source in turn (the command line), or only ``source_id`` (even a
    disabled one: asked for by name)."""
    from . import clients

    container = clients.container_client(settings)
    sources = load_sources(settings, container)
    chosen = select_sources(sources, source_id)
    return [
        run_source(
            settings, source, progress=progress(source) if progress else None, container=container
        )
        for source in chosen
    ]


def select_sources(sources: SourceSet, source_id: str | None) -> tuple[Source, ...]:
    if source_id is None:
        return sources.enabled
    source = sources.get(source_id)
    if source is None:
        known = ", ".join(s.id for s in sources.sources)
        raise SettingsError([f"there is no source {source_id!r} (sources: {known})"])
    return (source,)


# -- run records -----------------------------------------------------------------------------


class RunLog:
    """``.mail2blob/runs/<source>.json``: the last run, the last error and running totals of one
    source. Written after each run by the run itself (never by a run that found the source
    busy), read by the status page."""

    def __init__(self, container: Any, source: Source) -> None:
        self._container = container
        self._source = source
        self.blob_name = f"{RUNS_PREFIX}{source.state_key.lower().replace('/', '_')}.json"

    def load(self) -> dict[str, Any] | None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            data = self._container.download_blob(self.blob_name).readall()
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            logger.warning("cannot read %s: %s", self.blob_name, type(exc).__name__)
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def record(self, run: SourceRun) -> None:
        """Best effort: a record that cannot be written costs the status page a line, not the
        drain."""
        from azure.core.exceptions import AzureError

        record = self.load() or {}
        summary = run.result.to_dict()
        summary.pop("folders", None)
        summary.update(
            failed=len(run.result.failed),
            finished_at=now_iso(),
            outcome=run.outcome,
            aadsts=run.aadsts,
        )
        totals = record.get("totals") or {"runs": 0, "failed_runs": 0, "stored": 0, "bytes": 0}
        totals["runs"] += 1
        totals["stored"] += run.result.stored
        totals["bytes"] += run.result.bytes
        if run.outcome == "ok":
            record["last_success_at"] = summary["finished_at"]
        else:
            totals["failed_runs"] += 1
            record["last_error"] = {
                "at": summary["finished_at"],
                "kind": run.result.error_kind or "MessagesFailed",
                "message": run.reason,
                "aadsts": run.aadsts,
            }
        record.update(
            source=self._source.id, mailbox=self._source.mailbox, last_run=summary, totals=totals
        )
        body = json.dumps(record, indent=1, sort_keys=True).encode()
        try:
            self._upload(body)
        except AzureError as exc:
            logger.warning("cannot write %s: %s", self.blob_name, type(exc).__name__)

    def _upload(self, body: bytes) -> None:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        settings = ContentSettings(content_type="application/json")
        try:
            self._container.upload_blob(
                self.blob_name, body, overwrite=True, content_settings=settings
            )
        except ResourceNotFoundError:  # a consent failure comes before the container exists
            self._container.create_container()
            self._container.upload_blob(
                self.blob_name, body, overwrite=True, content_settings=settings
            )


# -- the queue -------------------------------------------------------------------------------


def tick_messages(settings: Settings, container: Any = None) -> list[str]:
    """One queue message per enabled source: what the timer puts on ``mail2blob-drain``."""
    sources = load_sources(settings, container)
    at = now_iso()
    return [
        json.dumps({"source": s.id, "mailbox": s.mailbox, "enqueued_at": at})
        for s in sources.enabled
    ]


def max_dequeue_count(host_json: Path) -> int:
    """``extensions.queues.maxDequeueCount`` of the app's host.json (the host's default, 5,
    when unset)."""
    try:
        host = json.loads(host_json.read_text(encoding="utf-8"))
        return int(host["extensions"]["queues"]["maxDequeueCount"])
    except (OSError, ValueError, KeyError, TypeError):
        return HOST_DEFAULT_MAX_DEQUEUE_COUNT


def handle_message(
    body: str,
    *,
    dequeue_count: int,
    max_dequeue_count: int,
    settings_factory: Callable[[], Settings] = Settings.from_env,
) -> str | None:
    """Drain the source a queue message names. Returns a poison record (JSON) for the poison
    queue when this was the last attempt and it failed; raises :class:`DrainFailed` when the
    host should retry; returns ``None`` otherwise."""
    try:
        message = json.loads(body)
        source_id = message["source"]
        if not isinstance(source_id, str):
            raise TypeError("'source' is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        # Retrying cannot repair a malformed message: straight to the poison queue.
        logger.error("%s source=? unreadable drain message: %s", POISON_EVENT, exc)
        return _poison_record(None, f"unreadable drain message: {exc}", body, dequeue_count)

    try:
        from . import clients

        settings = settings_factory()
        container = clients.container_client(settings)
        source = load_sources(settings, container).get(source_id)
        if source is None or not source.enabled:
            logger.info("source %s is no longer an enabled source; nothing to drain", source_id)
            return None
        run = run_source(settings, source, container=container)
    except Exception as exc:  # settings, sources.json, storage, or a bug
        reason = azure_reason(exc)
        if not isinstance(exc, Mail2BlobError):
            logger.exception("drain of source %s crashed", source_id)
        return _retry_or_poison(source_id, reason, body, dequeue_count, max_dequeue_count)

    logger.info(
        "mail2blob drain result %s",
        json.dumps(run.to_dict() | {"failed": len(run.result.failed)}, sort_keys=True),
        extra={"mail2blob_event": "drain_result", "source": source.id},
    )
    if run.outcome == "busy":
        logger.info("source %s is being drained by another worker; skipping", source.id)
        return None
    if run.outcome in ("ok", "consent_needed"):
        return None
    return _retry_or_poison(source.id, run.reason, body, dequeue_count, max_dequeue_count)


def _retry_or_poison(
    source_id: str, reason: str, body: str, dequeue_count: int, max_dequeue_count: int
) -> str:
    if dequeue_count < max_dequeue_count:
        raise DrainFailed(
            f"drain of source {source_id} failed (attempt {dequeue_count} of "
            f"{max_dequeue_count}; the host retries): {reason}"
        )
    logger.error(
        "%s source=%s attempts=%d reason=%s", POISON_EVENT, source_id, dequeue_count, reason
    )
    return _poison_record(source_id, reason, body, dequeue_count)


def _poison_record(source_id: str | None, reason: str, body: str, attempts: int) -> str:
    try:
        original: Any = json.loads(body)
    except ValueError:
        original = body
    return json.dumps(
        {
            "source": source_id,
            "reason": reason,
            "message": original,
            "attempts": attempts,
            "at": now_iso(),
        }
    )
