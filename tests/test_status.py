"""The status: ``GET /api/status`` (JSON, or an escaped HTML page for a browser) and
``python -m mail2blob status``, per source, against the local stack."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import azure.functions as func
import pytest

from mail2blob import cli, clients, status
from mail2blob.settings import Settings
from mail2blob.sources import SOURCES_BLOB
from mail2blob.status_page import SECURITY_HEADERS, prefers_html, render_status_html
from tests.functions_host import load_functions
from tests.mailgen import make_messages
from tests.stack import constants as c
from tests.stack.dovecot import APP_MAILBOX

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture(scope="module")
def status_function():
    functions = load_functions()
    trigger = functions["status"].binding("httpTrigger")
    assert trigger["route"] == "status" and str(trigger["authLevel"].value) == "function"
    assert [m.value for m in trigger["methods"]] == ["GET"]
    return functions["status"]


def call(function, accept: str | None = None, **params: str) -> func.HttpResponse:
    headers = {"Accept": accept} if accept else {}
    return function(
        func.HttpRequest("GET", "/api/status", headers=headers, params=params, body=b"")
    )


def use_sources(env: dict[str, str], sources: list[dict] | str) -> None:
    container = clients.container_client(Settings.from_env(env))
    data = sources if isinstance(sources, str) else json.dumps({"sources": sources})
    container.upload_blob(SOURCES_BLOB, data, overwrite=True)


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0.4, application/json;q=0.9", False),
        ("text/html;q=bogus, */*", False),
    ],
)
def test_html_only_when_the_client_prefers_it(accept: str | None, html: bool):
    assert prefers_html(accept) is html


def test_the_page_escapes_every_value():
    evil = '<script>alert("x")</script>'
    report = {
        "ok": False,
        "generated_at": "2026-11-26T10:00:00+00:00",
        "origin": evil,
        "sources": [
            {
                "id": "x",
                "enabled": True,
                "mailbox": evil,
                "auth": "delegated",
                "after": "keep",
                "token": {"state": "consent_needed", "aadsts": "AADSTS50173", "detail": evil},
                "last_run": {"ok": False, "outcome": evil, "started_at": evil, "stored": 0},
                "stored": evil,
                "backlog": None,
                "last_error": {"at": "t", "kind": "ConsentNeededError", "message": evil},
            }
        ],
    }
    page = render_status_html(report)
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page
    assert "AADSTS50173" in page and "consent needed" in page
    assert page.count("<tr>") == 2  # header and the one source


def test_status_function_json_and_html(stack, fresh, status_function):
    stack.dovecot.append_many(make_messages(2, seed=31))
    assert cli.main(["drain", "--quiet"]) == 0

    response = call(status_function)
    assert response.status_code == 200 and response.mimetype == "application/json"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    report = json.loads(response.get_body())
    (source,) = report["sources"]
    assert (report["origin"], source["id"], source["mailbox"]) == ("settings", "default", c.MAILBOX)
    assert source["token"]["state"] == "ok" and source["token"]["account"] == c.MAILBOX
    assert source["stored"] == 2 and source["backlog"] == 0 and source["healthy"]
    assert source["token_secret"] == "mail2blob-token-cache"
    body = response.get_body().decode()
    assert 'refresh_token": true' in body and 'secret":' not in body.replace("token_secret", "")

    page = call(status_function, BROWSER_ACCEPT)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    text = page.get_body().decode()
    assert text.startswith("<!doctype html>") and c.MAILBOX in text
    assert "All sources are healthy." in text

    assert call(status_function, source="default").status_code == 200
    missing = call(status_function, source="nope")
    assert missing.status_code == 404
    assert json.loads(missing.get_body())["error"] == "there is no source 'nope'"


def test_an_invalid_sources_blob_is_a_503_naming_the_problems(stack, fresh, status_function):
    use_sources(fresh, [{"id": "a", "mailbox": "x"}])
    response = call(status_function)
    assert response.status_code == 503
    report = json.loads(response.get_body())
    assert report["ok"] is False and report["sources"] == []
    assert report["problems"] == ["source 'a': mailbox: required, an e-mail address, got 'x'"]
    page = call(status_function, "text/html").get_body().decode()
    assert "source &#x27;a&#x27;: mailbox" in page


def test_app_source_credential_problems_show_with_their_aadsts(
    stack, fresh, status_function, monkeypatch
):
    use_sources(
        fresh,
        [
            {"id": "archive", "mailbox": c.MAILBOX, "token_secret": "mail2blob-token-cache"},
            {"id": "orders", "mailbox": APP_MAILBOX, "auth": "app"},
            {"id": "orders-2", "mailbox": APP_MAILBOX, "auth": "app", "enabled": False},
        ],
    )
    ok = json.loads(call(status_function).get_body())
    assert [s["token"]["state"] for s in ok["sources"]] == ["ok", "ok", "ok"]
    before = stack.identity.count("client_credentials")

    monkeypatch.setenv("MAIL2BLOB_CLIENT_SECRET", "the-secret-id-not-its-value")
    report = json.loads(call(status_function).get_body())
    # One client-credentials check serves every app-only source.
    assert stack.identity.count("client_credentials") == before + 1
    archive, orders, disabled = report["sources"]
    assert archive["token"]["state"] == "ok"  # a delegated cache is read offline
    assert orders["token"]["state"] == "credential_problem"
    assert orders["token"]["aadsts"] == "AADSTS7000215"
    assert "MAIL2BLOB_CLIENT_SECRET" in orders["token"]["detail"]
    assert "the-secret-id-not-its-value" not in json.dumps(report)
    assert report["ok"] is False and not disabled["enabled"]


def test_cli_status_shows_every_source(stack, fresh, capsys):
    use_sources(
        fresh,
        [
            {"id": "archive", "mailbox": c.MAILBOX, "token_secret": "mail2blob-token-cache"},
            {"id": "nobody", "mailbox": c.OTHER_USER},
        ],
    )
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sources from {SOURCES_BLOB}: NOT all healthy")
    assert f"[archive] {c.MAILBOX} (delegated, after keep)" in out
    assert f"[nobody] {c.OTHER_USER}" in out and "no token cache stored yet" in out

    assert cli.main(["status", "--json", "--source", "nobody"]) == 0
    (only,) = json.loads(capsys.readouterr().out)["sources"]
    assert only["id"] == "nobody" and only["token"]["state"] == "consent_needed"
    assert cli.main(["status", "--source", "nope"]) == cli.EXIT_SETTINGS


def test_cli_drain_reports_each_source_then_the_totals(stack, fresh, capsys):
    stack.dovecot.append_many(make_messages(3, seed=32))
    use_sources(
        fresh,
        [
            {"id": "archive", "mailbox": c.MAILBOX, "token_secret": "mail2blob-token-cache"},
            {"id": "nobody", "mailbox": c.OTHER_USER},
        ],
    )
    assert cli.main(["drain", "--json"]) == cli.EXIT_CONSENT
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["source"], x["outcome"], x["stored"]) for x in lines[:2]] == [
        ("archive", "ok", 3),
        ("nobody", "consent_needed", 0),
    ]
    assert lines[2]["sources"] == [
        {"source": "archive", "outcome": "ok"},
        {"source": "nobody", "outcome": "consent_needed"},
    ]
    summary = lines[2]
    assert (summary["ok"], summary["stored"], summary["failed"]) == (False, 3, [])
    assert summary["error_kind"] == "ConsentNeededError" and "consent" in summary["error"]
    assert summary["complete"] is False and summary["seconds"] > 0
    assert cli.main(["drain", "--json", "--source", "archive"]) == cli.EXIT_OK
    *_, summary = capsys.readouterr().out.splitlines()
    assert json.loads(summary)["ok"] is True


def test_an_unused_refresh_token_is_reported_before_it_expires(monkeypatch):
    class Store:
        def __init__(self, days_ago: int) -> None:
            self.updated_on = datetime.now(UTC) - timedelta(days=days_ago)

        def load(self) -> str:
            return json.dumps(
                {
                    "Account": {"a": {"username": c.MAILBOX, "home_account_id": "a"}},
                    "RefreshToken": {"r": {"credential_type": "RefreshToken", "secret": "x"}},
                }
            )

    settings = Settings.from_env(
        {
            "MAIL2BLOB_TENANT_ID": c.TENANT_ID,
            "MAIL2BLOB_CLIENT_ID": c.CLIENT_ID,
            "MAIL2BLOB_KEY_VAULT_URL": "https://kv.vault.azure.net",
            "MAIL2BLOB_MAILBOX": c.MAILBOX,
            "MAIL2BLOB_STORAGE": "https://st.blob.core.windows.net",
        }
    )
    for days_ago, expected in ((1, "ok"), (80, "expires")):
        monkeypatch.setattr(clients, "token_store", lambda s, d=days_ago: Store(d))
        state = status.delegated_token_state(settings, {})
        assert state["state"] == expected, state
        assert "secret" not in json.dumps(state).replace("refresh_token", "")
