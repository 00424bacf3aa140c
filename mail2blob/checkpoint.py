"""The checkpoint: per folder, the UIDVALIDITY and the highest UID below which every message is
stored (and post-actioned), plus messages that failed and are retried; and the mailbox lease that
keeps two drains (the timer and a CLI run, two scaled-out instances) from working at once.

Both live as small blobs under ``.mail2blob/`` in the destination container. The checkpoint is
only ever moved forward after the blobs it covers are stored, so it never runs ahead of storage.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .blob_destination import STATE_PREFIX
from .errors import DestinationError, DrainBusyError, azure_reason

logger = logging.getLogger(__name__)

LEASE_SECONDS = 60
_RENEW_EVERY_S = 15


@dataclass
class FolderState:
    uidvalidity: int = 0
    last_uid: int = 0
    #: uid -> {"reason": str, "attempts": int}; retried on every run
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MailboxState:
    folders: dict[str, FolderState] = field(default_factory=dict)

    def folder(self, name: str) -> FolderState:
        return self.folders.setdefault(name, FolderState())

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "folders": {n: asdict(s) for n, s in self.folders.items()},
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> MailboxState:
        raw = json.loads(text)
        folders = {
            name: FolderState(
                uidvalidity=int(f.get("uidvalidity", 0)),
                last_uid=int(f.get("last_uid", 0)),
                failed=dict(f.get("failed", {})),
            )
            for name, f in raw.get("folders", {}).items()
        }
        return cls(folders=folders)


def _mailbox_key(mailbox: str) -> str:
    return mailbox.lower().replace("/", "_")


class CheckpointStore:
    """Reads and writes one mailbox's state blob in ``container``."""

    def __init__(self, container: Any, mailbox: str) -> None:
        self._container = container
        self.blob_name = f"{STATE_PREFIX}state/{_mailbox_key(mailbox)}.json"

    def load(self) -> MailboxState:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            data = self._container.download_blob(self.blob_name).readall()
        except ResourceNotFoundError:
            return MailboxState()
        except AzureError as exc:
            raise DestinationError(
                f"cannot read checkpoint {self.blob_name}: {azure_reason(exc)}"
            ) from None
        try:
            return MailboxState.from_json(data.decode("utf-8"))
        except (ValueError, TypeError, AttributeError) as exc:
            # Refusing is safer than starting over silently (which re-reads the whole mailbox
            # but duplicates nothing, thanks to content-addressed names).
            raise DestinationError(
                f"checkpoint {self.blob_name} is unreadable ({exc}); delete it to start over"
            ) from None

    def save(self, state: MailboxState) -> None:
        from azure.core.exceptions import AzureError
        from azure.storage.blob import ContentSettings

        try:
            self._container.upload_blob(
                self.blob_name,
                state.to_json().encode("utf-8"),
                overwrite=True,
                content_settings=ContentSettings(content_type="application/json"),
            )
        except AzureError as exc:
            raise DestinationError(
                f"cannot write checkpoint {self.blob_name}: {azure_reason(exc)}"
            ) from None


class MailboxLease:
    """An exclusive blob lease on the mailbox, renewed in the background while a drain runs.

    ``check()`` raises when the lease was lost (storage unreachable for longer than the lease),
    so the drain stops before acting on the mailbox without holding it.
    """

    def __init__(self, container: Any, mailbox: str) -> None:
        self._container = container
        self.blob_name = f"{STATE_PREFIX}locks/{_mailbox_key(mailbox)}.lock"
        self._mailbox = mailbox
        self._lease: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._renewed_at = 0.0

    def acquire(self) -> MailboxLease:
        from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError

        blob = self._container.get_blob_client(self.blob_name)
        try:
            blob.upload_blob(b"", overwrite=False)
        except ResourceExistsError:
            pass
        except AzureError as exc:
            if getattr(exc, "status_code", None) != 412:  # 412: leased, so it exists
                raise DestinationError(
                    f"cannot create lock {self.blob_name}: {azure_reason(exc)}"
                ) from None
        try:
            self._lease = blob.acquire_lease(lease_duration=LEASE_SECONDS)
        except HttpResponseError as exc:
            if exc.status_code == 409:
                raise DrainBusyError(
                    f"another drain of {self._mailbox} is running (lease on {self.blob_name}); "
                    f"this run did nothing. A crashed run's lease expires within "
                    f"{LEASE_SECONDS} s."
                ) from None
            raise DestinationError(f"cannot lease {self.blob_name}: {azure_reason(exc)}") from None
        except AzureError as exc:
            raise DestinationError(f"cannot lease {self.blob_name}: {azure_reason(exc)}") from None
        self._renewed_at = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(_RENEW_EVERY_S):
            try:
                self._lease.renew()
                self._renewed_at = time.monotonic()
                self._lost = None
            except Exception as exc:  # noqa: BLE001 - recorded and raised by check()
                logger.warning("lease renewal for %s failed: %s", self._mailbox, azure_reason(exc))
                self._lost = type(exc).__name__

    def check(self) -> None:
        """Raise unless the lease is certainly still ours (renewed within its duration, with a
        safety margin)."""
        if time.monotonic() - self._renewed_at > LEASE_SECONDS - 10:
            raise DestinationError(
                f"lost the lease on {self._mailbox} ({self._lost or 'not renewed in time'})"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._lease is not None:
            try:
                self._lease.release()
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                logger.info(
                    "lease release for %s failed (it expires anyway): %s", self._mailbox, exc
                )
            self._lease = None

    def __enter__(self) -> MailboxLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
