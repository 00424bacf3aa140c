"""Timer trigger: one drain of the configured mailbox on ``%MAIL2BLOB_SCHEDULE%``."""

from __future__ import annotations

import json
import logging

import azure.functions as func

from mail2blob.settings import Settings

bp = func.Blueprint()
logger = logging.getLogger(__name__)


class DrainFailed(RuntimeError):
    """Raised so the Functions host records the invocation as failed."""


@bp.timer_trigger(
    arg_name="timer", schedule="%MAIL2BLOB_SCHEDULE%", run_on_startup=False, use_monitor=True
)
def drain_timer(timer: func.TimerRequest) -> None:
    from mail2blob.drain import drain_mailbox

    if timer.past_due:
        logger.info("drain timer is past due; running now")
    settings = Settings.from_env()
    result = drain_mailbox(settings)
    # One structured line per run: queryable in Application Insights (customDimensions).
    logger.info(
        "mail2blob drain result %s",
        json.dumps(result.to_dict() | {"failed": len(result.failed)}, sort_keys=True),
        extra={"mail2blob_event": "drain_result", "mailbox": settings.mailbox},
    )
    if not result.ok:
        raise DrainFailed(result.summary())
