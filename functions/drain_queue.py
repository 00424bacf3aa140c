"""Queue trigger on ``mail2blob-drain``: drains the one source a message names.

A busy source (another worker holds its lease) and a consent problem (logged as
``MAIL2BLOB_CONSENT_FAILED ...``) are not retried. Other failures raise, so the host makes the
message visible again after ``visibilityTimeout`` and retries; the last attempt
(``dequeue_count`` reaching host.json's ``maxDequeueCount``) writes ``{"source", "reason",
"message"}`` to ``mail2blob-drain-poison`` and returns, so the poison message carries the reason.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import azure.functions as func

bp = func.Blueprint()
logger = logging.getLogger(__name__)

HOST_JSON = Path(__file__).resolve().parents[1] / "host.json"


@functools.cache
def _max_dequeue_count() -> int:
    from mail2blob.fanout import max_dequeue_count

    return max_dequeue_count(HOST_JSON)


@bp.queue_trigger(arg_name="msg", queue_name="mail2blob-drain", connection="AzureWebJobsStorage")
@bp.queue_output(
    arg_name="poison", queue_name="mail2blob-drain-poison", connection="AzureWebJobsStorage"
)
def drain_queue(msg: func.QueueMessage, poison: func.Out[str]) -> None:
    from mail2blob.fanout import handle_message

    record = handle_message(
        msg.get_body().decode("utf-8", "replace"),
        dequeue_count=int(getattr(msg, "dequeue_count", None) or 1),
        max_dequeue_count=_max_dequeue_count(),
    )
    if record is not None:
        poison.set(record)
