"""Timer trigger on ``%MAIL2BLOB_SCHEDULE%``: the fan-out. It drains nothing itself; it puts one
message per enabled source on the ``mail2blob-drain`` queue (``functions/drain_queue.py`` drains
each), also when there is only the one source of the ``MAIL2BLOB_*`` settings.

A timer runs on one instance of a scaled-out app; the queue spreads the sources over instances,
bounded by host.json's ``extensions.queues`` and the app's ``maximumInstanceCount``.
"""

from __future__ import annotations

import logging
from typing import List  # noqa: UP035 - see drain_timer

import azure.functions as func

from mail2blob.settings import Settings

bp = func.Blueprint()
logger = logging.getLogger(__name__)


@bp.timer_trigger(
    arg_name="timer", schedule="%MAIL2BLOB_SCHEDULE%", run_on_startup=False, use_monitor=True
)
@bp.queue_output(arg_name="drains", queue_name="mail2blob-drain", connection="AzureWebJobsStorage")
# typing.List, not list: the worker checks a queue output's annotation with typing_inspect,
# which does not recognise list[str] and would refuse to load the function.
def drain_timer(timer: func.TimerRequest, drains: func.Out[List[str]]) -> None:  # noqa: UP006
    from mail2blob.fanout import tick_messages

    if timer.past_due:
        logger.info("drain timer is past due; running now")
    # Bad settings or an invalid .mail2blob/sources.json raise: the host records the failure
    # and the log names every problem.
    messages = tick_messages(Settings.from_env())
    drains.set(messages)
    logger.info("drain tick: %d sources queued on mail2blob-drain", len(messages))
