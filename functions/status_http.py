"""``GET /api/status`` (function key): every source's token state, last run, stored counts,
backlog and last error. JSON by default; an HTML page when the ``Accept`` header ranks
``text/html`` first (a browser). No secret or token is ever part of the answer."""

from __future__ import annotations

import json
import logging

import azure.functions as func

from mail2blob.errors import SettingsError
from mail2blob.settings import Settings

bp = func.Blueprint()
logger = logging.getLogger(__name__)


@bp.route(route="status", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def status(req: func.HttpRequest) -> func.HttpResponse:
    from mail2blob import status_page
    from mail2blob.status import sources_status

    code = 200
    try:
        report = sources_status(Settings.from_env())
    except SettingsError as exc:  # the settings or .mail2blob/sources.json
        logger.error("status: %s", exc)
        report = {"ok": False, "error": str(exc).splitlines()[0], "problems": exc.problems}
        report["sources"] = []
        code = 503
    if wanted := req.params.get("source"):
        report["sources"] = [s for s in report["sources"] if s["id"] == wanted]
        if code == 200 and not report["sources"]:
            report.update(ok=False, error=f"there is no source {wanted!r}", problems=[])
            code = 404
    if status_page.prefers_html(req.headers.get("accept")):
        body = status_page.render_status_html(report)
        mimetype = "text/html"
    else:
        body = json.dumps(report, indent=1, sort_keys=True, default=str)
        mimetype = "application/json"
    return func.HttpResponse(
        body,
        status_code=code,
        headers=dict(status_page.SECURITY_HEADERS),
        mimetype=mimetype,
        charset="utf-8",
    )
