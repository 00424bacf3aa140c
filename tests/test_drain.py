"""The drain engine against the local stack: Dovecot (XOAUTH2 validated by Dovecot), Azurite, and
the identity and Key Vault stand-ins reached through MSAL and SecretClient."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from mail2blob import clients
from mail2blob.blob_destination import STATE_PREFIX
from mail2blob.checkpoint import CheckpointStore, MailboxLease
from mail2blob.drain import Drain, DrainOptions, drain_mailbox
from mail2blob.settings import Settings
from tests.mailgen import make_large_message, make_messages
from tests.stack import constants as c


def build_drain(env: dict[str, str], **options) -> Drain:
    settings = Settings.from_env(env)
    destination = clients.blob_destination(settings)
    container = destination.container
    opts = DrainOptions(folders=settings.folders, after=settings.after, **options)
    return Drain(
        mailbox=settings.mailbox,
        source=clients.imap_source(settings),
        destination=destination,
        checkpoint=CheckpointStore(container, settings.mailbox),
        lease=MailboxLease(container, settings.mailbox),
        options=opts,
    )


def stored_blobs(env: dict[str, str]) -> dict[str, bytes]:
    container = clients.container_client(Settings.from_env(env))
    if not container.exists():
        return {}
    return {
        b.name: container.download_blob(b.name).readall()
        for b in container.list_blobs()
        if not b.name.startswith(STATE_PREFIX)
    }


def digests(bodies) -> list[str]:
    return sorted(hashlib.sha256(b).hexdigest() for b in bodies)


def test_drain_stores_every_message_byte_for_byte_once(stack, fresh):
    messages = make_messages(300, seed=3)
    stack.dovecot.append_many(messages)
    in_mailbox = stack.dovecot.fetch_all()

    result = drain_mailbox(Settings.from_env(fresh))

    assert result.ok, result.error
    assert (result.stored, result.already_present, result.backlog) == (300, 0, 0)
    assert result.complete
    blobs = stored_blobs(fresh)
    assert digests(blobs.values()) == digests(m[b"BODY[]"] for m in in_mailbox.values())
    assert result.bytes == sum(len(b) for b in blobs.values())
    # browsable, content-addressed names under mailbox/folder/date
    for name, body in blobs.items():
        assert name.startswith(f"{c.MAILBOX}/INBOX/2")
        assert name.endswith(hashlib.sha256(body).hexdigest()[:32] + ".eml")
    # nothing was marked read by fetching
    assert all(b"\\Seen" not in m[b"FLAGS"] for m in stack.dovecot.fetch_all().values())

    again = drain_mailbox(Settings.from_env(fresh))
    assert again.ok and (again.stored, again.already_present) == (0, 0)
    assert len(stored_blobs(fresh)) == 300


def test_blob_properties_and_metadata(stack, fresh):
    stack.dovecot.append_many(make_messages(3, seed=5))
    assert drain_mailbox(Settings.from_env(fresh)).ok
    container = clients.container_client(Settings.from_env(fresh))
    blob = next(b for b in container.list_blobs(include=["metadata"]) if b.name.endswith(".eml"))
    assert blob.content_settings.content_type == "message/rfc822"
    meta = blob.metadata
    assert set(meta) >= {"message_id", "from_addr", "subject", "date", "size", "sha256"}
    assert all(v.isascii() for v in meta.values())
    assert int(meta["size"]) == blob.size


@pytest.mark.parametrize("after", ["seen", "move:Archive/Done", "delete"])
def test_post_action_happens_only_to_stored_messages(stack, fresh, monkeypatch, after):
    messages = make_messages(25, seed=11)
    stack.dovecot.append_many(messages)
    env = fresh | {"MAIL2BLOB_AFTER": after}
    result = drain_mailbox(Settings.from_env(env))
    assert result.ok and result.stored == 25
    inbox = stack.dovecot.fetch_all("INBOX")
    if after == "seen":
        assert len(inbox) == 25
        assert all(b"\\Seen" in m[b"FLAGS"] for m in inbox.values())
    elif after == "delete":
        assert inbox == {}
    else:
        assert inbox == {}
        moved = stack.dovecot.fetch_all("Archive/Done")
        assert digests(m[b"BODY[]"] for m in moved.values()) == digests(
            messages_of(stored_blobs(env))
        )
    assert digests(stored_blobs(env).values()) == digests(messages)


def messages_of(blobs: dict[str, bytes]):
    return blobs.values()


def test_rotated_refresh_token_is_saved_before_use(stack, fresh):
    stack.identity.strict_rotation(True)
    stack.identity.set_token_lifetime(60)  # MSAL refreshes tokens with < 5 min left
    stack.consent()
    versions_before = len(stack.keyvault.versions("mail2blob-token-cache"))
    stack.dovecot.append_many(make_messages(5, seed=2))
    first = drain_mailbox(Settings.from_env(fresh))
    assert first.ok, first.error
    # strict mode: the refresh token used by the first run is dead now; the second run only
    # works if the rotated one was saved
    second = drain_mailbox(Settings.from_env(fresh))
    assert second.ok, second.error
    assert len(stack.keyvault.versions("mail2blob-token-cache")) >= versions_before + 2


def test_revoked_consent_is_a_clear_error_and_changes_nothing(stack, fresh):
    stack.dovecot.append_many(make_messages(5, seed=4))
    stack.identity.set_token_lifetime(60)
    stack.consent()
    stack.identity.revoke(c.MAILBOX)
    versions = stack.keyvault.versions("mail2blob-token-cache")
    before = stack.dovecot.fetch_all()

    result = drain_mailbox(Settings.from_env(fresh))

    assert not result.ok
    assert result.error_kind == "ConsentNeededError"
    assert "AADSTS50173" in result.error and "consent" in result.error.lower()
    assert stored_blobs(fresh) == {}
    container = clients.container_client(Settings.from_env(fresh))
    assert not container.exists() or not list(container.list_blobs())
    assert stack.dovecot.fetch_all() == before
    assert stack.keyvault.versions("mail2blob-token-cache") == versions


def test_no_token_yet_names_the_consent_link(stack, fresh, monkeypatch):
    monkeypatch.setenv("MAIL2BLOB_TOKEN_SECRET", "never-consented")
    result = drain_mailbox(Settings.from_env())
    assert result.error_kind == "ConsentNeededError"
    assert "consent" in result.error and "python -m mail2blob consent" in result.error


def test_expiring_access_token_reconnects_and_finishes(stack, fresh):
    stack.identity.set_token_lifetime(60)  # always inside the 5-minute refresh margin
    stack.consent()
    stack.dovecot.append_many(make_messages(60, seed=8))
    drain = build_drain(fresh, batch_messages=10)
    result = drain.run()
    assert result.ok and result.stored == 60
    assert drain.source.reconnects >= 3


def test_time_budget_stops_then_next_run_completes(stack, fresh):
    stack.dovecot.append_many(make_messages(50, seed=9))
    ticks = iter(range(10_000))
    drain = build_drain(fresh, batch_messages=10, time_budget_s=4)
    drain._clock = lambda: float(next(ticks))
    partial = drain.run()
    assert partial.ok and not partial.complete
    assert 0 < partial.stored < 50
    assert partial.stored + partial.backlog == 50

    rest = drain_mailbox(Settings.from_env(fresh))
    assert rest.ok and rest.complete
    assert rest.stored == 50 - partial.stored and rest.already_present == 0
    assert len(stored_blobs(fresh)) == 50


def test_uidvalidity_change_stores_nothing_twice(stack, fresh):
    messages = make_messages(20, seed=10)
    stack.dovecot.append_many(messages)
    assert drain_mailbox(Settings.from_env(fresh)).stored == 20
    old = stack.dovecot.uidvalidity("INBOX")
    stack.dovecot.recreate_folder_with_new_uidvalidity("INBOX")
    assert stack.dovecot.uidvalidity("INBOX") != old

    result = drain_mailbox(Settings.from_env(fresh))
    assert result.ok
    assert (result.stored, result.already_present) == (0, 20)
    assert len(stored_blobs(fresh)) == 20


def test_large_message_is_fetched_in_pieces_and_staged(stack, fresh):
    big = make_large_message(3)
    stack.dovecot.append_many([big, *make_messages(3, seed=12)])
    drain = build_drain(fresh, large_message_bytes=1024 * 1024, chunk_bytes=256 * 1024)
    result = drain.run()
    assert result.ok and result.stored == 4
    assert hashlib.sha256(big).hexdigest() in {
        hashlib.sha256(b).hexdigest() for b in stored_blobs(fresh).values()
    }


def test_two_drains_at_once_one_waits_out(stack, fresh):
    from mail2blob.errors import DrainBusyError

    settings = Settings.from_env(fresh)
    container = clients.container_client(settings)
    held = MailboxLease(container, settings.mailbox).acquire()
    try:
        result = drain_mailbox(settings)
    finally:
        held.release()
    assert result.error_kind == DrainBusyError.__name__
    assert "another drain" in result.error


def test_cli_drain_json_and_status(stack, fresh, tmp_path):
    stack.dovecot.append_many(make_messages(7, seed=13))
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}='{v}'\n" for k, v in fresh.items()))
    import os

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL2BLOB_")}
    run = subprocess.run(
        [sys.executable, "-m", "mail2blob", "--env-file", str(env_file), "drain", "--json"],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["stored"] == 7 and result["ok"] is True
    status = subprocess.run(
        [sys.executable, "-m", "mail2blob", "--env-file", str(env_file), "status", "--json"],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    (data,) = json.loads(status.stdout)["sources"]  # the one source of the settings
    assert data["token"]["state"] == "ok" and data["token"]["account"] == c.MAILBOX
    assert data["checkpoint"]["INBOX"]["last_uid"] >= 7
    assert data["last_run"]["stored"] == 7


def test_cli_exit_status_for_consent_needed(stack, fresh):
    import os

    env = {**os.environ, "MAIL2BLOB_TOKEN_SECRET": "nobody-consented"}
    run = subprocess.run(
        [sys.executable, "-m", "mail2blob", "drain", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 3
    assert json.loads(run.stdout.strip().splitlines()[-1])["error_kind"] == "ConsentNeededError"


def test_timer_function_runs_a_drain_against_the_stack(stack, fresh, monkeypatch, caplog):
    """The timer fans out (one queue message, for the one source of the settings); the queue
    function drains it. A consent problem is logged, not retried; another failure raises so the
    host retries, and the last attempt ends in the poison queue with the reason."""
    from azure.functions.timer import TimerRequest

    from tests.functions_host import Out, QueueHost, load_functions

    functions = load_functions()
    timer, worker = functions["drain_timer"], functions["drain_queue"]
    binding = timer.binding("timerTrigger")
    assert binding["schedule"] == "%MAIL2BLOB_SCHEDULE%"
    queue = QueueHost(stack.azurite.connection_string, timer.binding("queue")["queueName"])
    assert worker.binding("queueTrigger")["queueName"] == queue.name
    stack.dovecot.append_many(make_messages(4, seed=14))

    def tick() -> list:
        drains = Out()
        timer(TimerRequest(past_due=False), drains)
        queue.send(drains.value)
        return queue.invoke_all(worker, lambda: {"poison": Out()})

    ((message, out, error),) = tick()
    assert json.loads(message.get_body())["source"] == "default"
    assert error is None and out["poison"].value is None
    assert len(stored_blobs(fresh)) == 4

    # Consent is gone: logged once as the stable event, not retried (nothing to retry).
    stack.identity.set_token_lifetime(60)  # the next run must refresh...
    stack.consent()
    stack.identity.revoke(c.MAILBOX)  # ...and the grant is gone
    with caplog.at_level("ERROR", logger="mail2blob.fanout"):
        ((_, out, error),) = tick()
    assert error is None and out["poison"].value is None and queue.peek_all() == []
    (event,) = [r.getMessage() for r in caplog.records if "CONSENT_FAILED" in r.getMessage()]
    assert event.startswith("MAIL2BLOB_CONSENT_FAILED source=default ")
    assert f"mailbox={c.MAILBOX} aadsts=AADSTS50173" in event

    # A folder that does not exist: raise (the host retries), then poison with the reason.
    stack.consent()
    monkeypatch.setenv("MAIL2BLOB_FOLDERS", "INBOX/Missing")
    ((_, _, error),) = tick()
    assert "attempt 1 of 3" in str(error) and "SELECT INBOX/Missing failed" in str(error)
    ((_, _, error),) = queue.invoke_all(worker, lambda: {"poison": Out()})
    assert "attempt 2 of 3" in str(error)
    ((_, out, error),) = queue.invoke_all(worker, lambda: {"poison": Out()})
    assert error is None and queue.peek_all() == []
    poison = json.loads(out["poison"].value)
    assert poison["source"] == "default" and poison["message"]["source"] == "default"
    assert "SELECT INBOX/Missing failed" in poison["reason"]


def test_new_uidvalidity_of_an_empty_folder_is_checkpointed(stack, fresh):
    """With nothing to fetch there is no batch, yet the checkpoint must learn the folder's new
    UIDVALIDITY (or every later run would warn of the change and start over)."""
    stack.dovecot.append_many(make_messages(3, seed=15))
    env = fresh | {"MAIL2BLOB_AFTER": "delete"}
    assert drain_mailbox(Settings.from_env(env)).stored == 3
    new = stack.dovecot.recreate_folder_with_new_uidvalidity("INBOX")

    assert drain_mailbox(Settings.from_env(env)).ok
    container = clients.container_client(Settings.from_env(env))
    state = CheckpointStore(container, c.MAILBOX).load()
    assert state.folders["INBOX"].uidvalidity == new
