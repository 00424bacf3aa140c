"""Many sources through the queue path, against the local stack: the timer's user function fans
out, its output binding's messages go through Azurite's Queue service, and the queue function's
user code drains each source, called with real ``azure.functions`` queue messages."""

from __future__ import annotations

import json
import threading
import time

import msal
import pytest
from imapclient.exceptions import LoginError

from mail2blob import clients
from mail2blob.blob_destination import STATE_PREFIX
from mail2blob.fanout import POISON_QUEUE_NAME, QUEUE_NAME, drain_sources
from mail2blob.settings import IMAP_APP_SCOPE, Settings
from mail2blob.sources import SOURCES_BLOB
from tests.functions_host import Out, QueueHost, load_functions
from tests.mailgen import make_messages
from tests.stack import constants as c
from tests.stack.dovecot import APP_MAILBOX, app_principal_id

DELEGATED_SECRET = "mail2blob-token-cache"  # what the `fresh` fixture consented MAILBOX into

#: MAILBOX delegated (keep); SHARED_MAILBOX with MAILBOX's token (move); APP_MAILBOX app-only
#: (delete).
THREE_SOURCES = [
    {"id": "archive", "mailbox": c.MAILBOX, "token_secret": DELEGATED_SECRET},
    {
        "id": "shared",
        "mailbox": c.SHARED_MAILBOX,
        "token_secret": DELEGATED_SECRET,
        "after": "move:Done",
        "prefix": "team/shared",
    },
    {"id": "orders", "mailbox": APP_MAILBOX, "auth": "app", "after": "delete"},
]
SEEDED = {c.MAILBOX: 5, c.SHARED_MAILBOX: 4, APP_MAILBOX: 3, c.OTHER_USER: 2}


@pytest.fixture(scope="module")
def functions():
    return load_functions()


@pytest.fixture
def many(stack, fresh):
    """Every seeded mailbox emptied and given fresh mail; the settings env of ``fresh``."""
    for index, (mailbox, count) in enumerate(SEEDED.items()):
        stack.dovecot.delete_all(mailbox)
        stack.dovecot.append_many(make_messages(count, seed=40 + index), user=mailbox)
    yield fresh
    for mailbox in SEEDED:
        if mailbox != c.MAILBOX:
            stack.dovecot.delete_all(mailbox)


def use_sources(env: dict[str, str], sources: list[dict]) -> None:
    container = clients.container_client(Settings.from_env(env))
    container.upload_blob(SOURCES_BLOB, json.dumps({"sources": sources}), overwrite=True)


def tick(stack, functions) -> list:
    """One timer tick, then every queued message delivered once to the queue function."""
    from azure.functions.timer import TimerRequest

    queue = QueueHost(stack.azurite.connection_string, QUEUE_NAME)
    drains = Out()
    functions["drain_timer"](TimerRequest(past_due=False), drains)
    queue.send(drains.value)
    return queue.invoke_all(functions["drain_queue"], lambda: {"poison": Out()})


def mail_blobs(env: dict[str, str]) -> dict[str, bytes]:
    container = clients.container_client(Settings.from_env(env))
    return {
        b.name: container.download_blob(b.name).readall()
        for b in container.list_blobs()
        if not b.name.startswith(STATE_PREFIX)
    }


def get_status(functions, accept: str = "application/json"):
    import azure.functions as func

    request = func.HttpRequest("GET", "/api/status", headers={"Accept": accept}, body=b"")
    return functions["status"](request)


def test_three_sources_with_different_auth_and_post_actions_drain_in_one_tick(
    stack, many, functions
):
    use_sources(many, THREE_SOURCES)

    happened = tick(stack, functions)

    bodies = [json.loads(message.get_body()) for message, _, _ in happened]
    assert [b["source"] for b in bodies] == ["archive", "shared", "orders"]
    assert [(error, out["poison"].value) for _, out, error in happened] == [(None, None)] * 3
    blobs = mail_blobs(many)
    by_prefix = {
        prefix: len([n for n in blobs if n.startswith(prefix + "/INBOX/")])
        for prefix in (c.MAILBOX, "team/shared", APP_MAILBOX)
    }
    assert by_prefix == {c.MAILBOX: 5, "team/shared": 4, APP_MAILBOX: 3}
    assert len(blobs) == 12
    # keep / move:Done (with MAILBOX's token) / delete (app-only)
    assert len(stack.dovecot.fetch_all(user=c.MAILBOX)) == 5
    assert stack.dovecot.fetch_all(user=c.SHARED_MAILBOX) == {}
    assert len(stack.dovecot.fetch_all("Done", user=c.SHARED_MAILBOX)) == 4
    assert stack.dovecot.fetch_all(user=APP_MAILBOX) == {}

    response = get_status(functions)
    assert response.status_code == 200 and response.mimetype == "application/json"
    report = json.loads(response.get_body())
    assert report["ok"] is True and report["origin"] == SOURCES_BLOB
    status = {s["id"]: s for s in report["sources"]}
    assert {k: (s["token"]["state"], s["stored"], s["backlog"]) for k, s in status.items()} == {
        "archive": ("ok", 5, 0),
        "shared": ("ok", 4, 0),
        "orders": ("ok", 3, 0),
    }
    assert status["shared"]["token"]["account"] == c.MAILBOX  # the delegate's token
    assert status["orders"]["token"]["credential"] == "client secret"
    assert status["shared"]["checkpoint"]["INBOX"]["last_uid"] > 0
    assert all(s["last_error"] is None and s["last_run"]["ok"] for s in status.values())

    # The next tick finds nothing new, and the totals count both runs.
    assert [error for _, _, error in tick(stack, functions)] == [None] * 3
    report = json.loads(get_status(functions).get_body())
    assert [(s["totals"]["runs"], s["stored"]) for s in report["sources"]] == [
        (2, 5),
        (2, 4),
        (2, 3),
    ]
    assert len(mail_blobs(many)) == 12


def test_a_revoked_source_fails_alone_and_the_status_names_its_aadsts(
    stack, many, functions, caplog
):
    stack.identity.set_token_lifetime(60)  # every run refreshes its token
    stack.consent()
    stack.consent(c.OTHER_USER, secret_name="mail2blob-token-mallory")
    stack.identity.revoke(c.OTHER_USER)
    use_sources(many, [*THREE_SOURCES, {"id": "mallory", "mailbox": c.OTHER_USER}])

    with caplog.at_level("INFO"):
        happened = tick(stack, functions)

    # Not retried (nothing to retry) and not poisoned: one stable event instead.
    assert [(error, out["poison"].value) for _, out, error in happened] == [(None, None)] * 4
    events = [r.getMessage() for r in caplog.records if "CONSENT_FAILED" in r.getMessage()]
    assert events == [
        f"MAIL2BLOB_CONSENT_FAILED source=mallory mailbox={c.OTHER_USER} aadsts=AADSTS50173 "
        "auth=delegated"
    ]
    assert not [r for r in caplog.records if "Bearer" in r.getMessage() or "eyJ" in r.getMessage()]
    blobs = mail_blobs(many)
    assert len(blobs) == 12 and not [n for n in blobs if n.startswith(c.OTHER_USER)]
    assert len(stack.dovecot.fetch_all(user=c.OTHER_USER)) == 2  # untouched

    report = json.loads(get_status(functions).get_body())
    assert report["ok"] is False
    status = {s["id"]: s for s in report["sources"]}
    mallory = status.pop("mallory")
    assert mallory["token"]["state"] == "consent_needed"
    assert mallory["token"]["aadsts"] == "AADSTS50173"
    assert "consent" in mallory["token"]["detail"].lower()
    assert mallory["last_error"]["kind"] == "ConsentNeededError"
    assert mallory["healthy"] is False and mallory["stored"] == 0
    assert all(s["healthy"] and s["stored"] == SEEDED[s["mailbox"]] for s in status.values())

    # Consent again: the status says so before the next run, and the next run drains it.
    time.sleep(1.1)  # Key Vault and the run record have one-second resolution
    stack.consent(c.OTHER_USER, secret_name="mail2blob-token-mallory")
    report = json.loads(get_status(functions).get_body())
    (mallory,) = [s for s in report["sources"] if s["id"] == "mallory"]
    assert mallory["token"]["state"] == "ok" and "consent renewed" in mallory["token"]["detail"]
    (run,) = drain_sources(Settings.from_env(many), source_id="mallory")
    assert run.outcome == "ok" and run.result.stored == 2
    report = json.loads(get_status(functions).get_body())
    assert report["ok"] is True and len(mail_blobs(many)) == 14


def test_two_workers_never_drain_one_source_at_once(stack, many, functions, monkeypatch, caplog):
    from azure.functions.queue import QueueMessage

    from mail2blob.imap_source import ImapSource

    use_sources(many, THREE_SOURCES[:1])
    # Each fetch takes a while, so both workers are certainly inside a drain together.
    original_fetch = ImapSource.fetch

    def slow_fetch(self, uids):
        time.sleep(0.5)
        return original_fetch(self, uids)

    monkeypatch.setattr(ImapSource, "fetch", slow_fetch)
    body = json.dumps({"source": "archive"}).encode()
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def worker(number: int) -> None:
        start.wait()
        poison = Out()
        try:
            functions["drain_queue"](
                QueueMessage(id=str(number), body=body, dequeue_count=1), poison
            )
            outcomes.append(poison.value)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes.append(exc)

    with caplog.at_level("INFO"):
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert outcomes == [None, None]  # neither raised (no retry), neither poisoned
    busy = [r for r in caplog.records if "being drained by another worker" in r.getMessage()]
    assert len(busy) == 1
    results = [
        json.loads(r.getMessage().removeprefix("mail2blob drain result "))
        for r in caplog.records
        if r.getMessage().startswith("mail2blob drain result ")
    ]
    assert sorted((r["outcome"], r["stored"]) for r in results) == [("busy", 0), ("ok", 5)]
    assert len(mail_blobs(many)) == 5
    # Only the worker that drained recorded a run.
    report = json.loads(get_status(functions).get_body())
    assert report["sources"][0]["totals"]["runs"] == 1


def test_failures_are_retried_then_poisoned_with_the_reason(stack, many, functions):
    # The app may not open MAILBOX (no Add-MailboxPermission): the login is refused.
    use_sources(many, [{"id": "ungranted", "mailbox": c.MAILBOX, "auth": "app"}])
    queue = QueueHost(stack.azurite.connection_string, QUEUE_NAME)
    poison_queue = QueueHost(stack.azurite.connection_string, POISON_QUEUE_NAME)

    errors = [error for _, _, error in tick(stack, functions)]
    for attempt in (2, 3):
        happened = queue.invoke_all(functions["drain_queue"], lambda: {"poison": Out()})
        errors += [error for _, _, error in happened]
        ((message, out, _),) = happened
        assert message.dequeue_count == attempt
    assert [str(e).split(";")[0].split("(")[1] for e in errors[:2]] == [
        "attempt 1 of 3",
        "attempt 2 of 3",
    ]
    assert errors[2] is None and queue.peek_all() == []  # the last attempt returns...
    poison_queue.send(out["poison"].value)  # ...and the output binding writes the record
    (stored,) = poison_queue.peek_all()
    record = json.loads(stored)
    assert record["source"] == "ungranted" and record["attempts"] == 3
    assert record["message"]["source"] == "ungranted"
    assert record["reason"].startswith("LoginRefusedError: the IMAP server refused the app-only")
    assert "Add-MailboxPermission" in record["reason"]
    assert mail_blobs(many) == {}

    # A message nobody can read goes to the poison queue at once.
    from azure.functions.queue import QueueMessage

    poison = Out()
    functions["drain_queue"](QueueMessage(id="x", body=b"not json", dequeue_count=1), poison)
    assert json.loads(poison.value)["reason"].startswith("unreadable drain message")


def test_app_only_tokens_open_only_granted_mailboxes(stack):
    app = msal.ConfidentialClientApplication(
        c.CLIENT_ID,
        client_credential=c.CLIENT_SECRET,
        authority=stack.identity.authority,
        instance_discovery=False,
        http_client=stack.msal_session(),
    )
    token = app.acquire_token_for_client([IMAP_APP_SCOPE])["access_token"]
    claims = stack.signing_key.verify(token, audience=c.OUTLOOK_AUDIENCE)
    assert claims["roles"] == ["IMAP.AccessAsApp"] and "preferred_username" not in claims
    assert claims["oid"] == app_principal_id(c.CLIENT_ID)
    client = stack.dovecot.xoauth2_client(token, user=APP_MAILBOX)
    client.logout()
    for mailbox in (c.MAILBOX, c.SHARED_MAILBOX):  # not granted to the app
        with pytest.raises(LoginError):
            stack.dovecot.xoauth2_client(token, user=mailbox)
    # A user's delegated token does not open the app's mailbox either.
    with pytest.raises(LoginError):
        stack.dovecot.xoauth2_client(stack.identity.mint_access_token(c.MAILBOX), user=APP_MAILBOX)
