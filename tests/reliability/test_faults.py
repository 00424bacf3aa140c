"""Faults: connections cut at every phase (through the proxy of ``proxy.py``), dependencies
failing (Azurite stopped, Key Vault and the identity platform throttling, failing and hanging,
Dovecot restarted), Exchange Online's throttling and ``AccessTokenExpired`` BYE, and two drains
of one mailbox at once.

Every scenario ends the same way: the run completes by itself, or stops with a clear error and
the next run completes; then every message is stored exactly once and no post-action touched an
unstored message.
"""

from __future__ import annotations

import threading
import time

import pytest

from mail2blob import tokens
from mail2blob.drain import drain_mailbox
from mail2blob.settings import Settings
from tests.mailgen import make_messages
from tests.reliability import proxy as px
from tests.reliability import report
from tests.reliability.harness import (
    Served,
    blob_count,
    break_lease,
    child_result,
    container_of,
    final_mailbox_problems,
    start_drain_child,
    stored_prefixes,
    verify_storage,
    write_env_file,
    wrong_post_actions,
)
from tests.reliability.proxy import Rule
from tests.test_drain import build_drain


class Outcome:
    """The runs of one scenario and their verification."""

    def __init__(self, stack, env: dict[str, str], served: Served) -> None:
        self.stack = stack
        self.env = env
        self.served = served
        self.runs: list = []
        self.sleeps: list[float] = []
        self.current = None  # the drain running now (its result fills in as it goes)

    def drain(self, **options):
        drain = self.current = build_drain(self.env, **options)
        drain._sleep = self._sleep
        result = drain.run()
        self.runs.append(result)
        return result

    def _sleep(self, seconds: float) -> None:
        import time

        self.sleeps.append(seconds)
        time.sleep(seconds)

    def settle(
        self, section: str, kind: str, injected: int, *, recover: bool = True, note: str = ""
    ) -> None:
        """Run until complete (at most twice more), then verify and record the figures.
        ``recover``: the first run must have completed despite the fault."""
        for _ in range(2):
            if self.runs and self.runs[-1].complete and self.runs[-1].ok:
                break
            self.drain()
        after = self.env.get("MAIL2BLOB_AFTER", "keep")
        figures = verify_storage(self.env, list(self.served.bodies.values()))
        prefixes = stored_prefixes(self.env)
        wrong = wrong_post_actions(self.stack.dovecot, self.served, after, prefixes)
        wrong += final_mailbox_problems(self.stack.dovecot, self.served, after)
        report.record(
            section,
            kind,
            injected=injected,
            expected=figures.expected,
            stored=figures.stored,
            duplicated=figures.duplicated + figures.unexpected,
            lost=figures.lost,
            wrong_post_actions=len(wrong),
            note=note or self.note(),
        )
        assert self.runs[-1].complete and self.runs[-1].ok, self.runs[-1].error
        if recover:
            assert self.runs[0].complete and self.runs[0].ok, self.runs[0].error
        assert (figures.lost, figures.duplicated, figures.unexpected) == (0, 0, 0)
        assert not wrong, wrong[:10]

    def note(self) -> str:
        first = self.runs[0]
        if first.complete and first.ok:
            return "recovered within the run"
        return f"run stopped ({first.error_kind}); next run completed"


def seeded(stack, env: dict[str, str], count: int = 60, seed: int = 21) -> Outcome:
    stack.dovecot.append_many(make_messages(count, seed=seed, size_kb=8))
    return Outcome(stack, env, Served.snapshot(stack.dovecot))


# -- IMAP connection cut at each phase -----------------------------------------------------------

IMAP_CUTS = {
    "login": lambda: Rule(px.IMAP_LOGIN, action="drop"),
    "select": lambda: Rule(px.IMAP_SELECT, cut="s2c", after=0),
    "mid-FETCH literal": lambda: Rule(px.IMAP_FETCH_BODY, cut="s2c", after=30_000),
    # the server moved the messages, the engine never hears so: the next attempt finds them gone
    "post-action (MOVE)": lambda: Rule(px.IMAP_MOVE, cut="s2c", after=0),
}


@pytest.mark.parametrize("phase", list(IMAP_CUTS))
def test_imap_connection_cut(stack, fresh, proxies, phase):
    imap = proxies.imap()
    imap.add(IMAP_CUTS[phase]())
    env = proxies.env(fresh) | {"MAIL2BLOB_AFTER": "move:Archive"}
    outcome = seeded(stack, env)
    outcome.drain(batch_messages=20)
    assert imap.fired() == 1
    outcome.settle("fault", f"IMAP cut: {phase}", imap.fired())


# -- Blob Storage and Key Vault connections cut -------------------------------------------------

MESSAGE_PUT = px.BLOB_MESSAGE_PUT
CHECKPOINT_PUT = px.BLOB_CHECKPOINT_PUT

BLOB_CUTS = {
    "mid-upload": lambda: Rule(MESSAGE_PUT, cut="c2s", after=2000, times=2),
    "checkpoint write, request cut": lambda: Rule(CHECKPOINT_PUT, cut="c2s", after=40),
    "checkpoint write, answer lost": lambda: Rule(CHECKPOINT_PUT, cut="s2c", after=0),
}


@pytest.mark.parametrize("phase", list(BLOB_CUTS))
@pytest.mark.usefixtures("fast_sdk_retries")
def test_blob_connection_cut(stack, fresh, proxies, phase):
    blob = proxies.blob()
    blob.add(BLOB_CUTS[phase]())
    env = proxies.env(fresh) | {"MAIL2BLOB_AFTER": "delete"}
    outcome = seeded(stack, env)
    outcome.drain(batch_messages=20)
    assert blob.fired() == (2 if phase == "mid-upload" else 1)
    outcome.settle("fault", f"Blob cut: {phase}", blob.fired())


def test_key_vault_write_of_rotated_token_cut(stack, fresh, proxies):
    """The vault stored the rotated token but its answer was lost: the SDK writes it again. In
    strict rotation (the old refresh token dies when used) the next run only works if the rotated
    one was saved."""
    stack.identity.set_token_lifetime(60)  # MSAL refreshes tokens with < 5 min left
    stack.consent()
    vault = proxies.vault()
    vault.add(Rule(rb"PUT /secrets/", cut="s2c", after=0))
    env = proxies.env(fresh)
    outcome = seeded(stack, env)
    outcome.drain()
    assert vault.fired() == 1
    assert stack.identity.count("refresh_token") >= 1
    vault.clear()
    rotations = stack.identity.count("refresh_token")
    second = outcome.drain()
    assert second.ok, second.error
    assert stack.identity.count("refresh_token") > rotations  # it used the saved rotated token
    outcome.settle("fault", "Key Vault cut: write of the rotated token", vault.fired())


@pytest.mark.usefixtures("fast_sdk_retries")
def test_key_vault_write_failing_stops_before_touching_anything(stack, fresh, proxies):
    """Every write of the rotated token fails: the run stops before logging in; nothing stored,
    nothing changed. Like Entra, the stand-in keeps the old refresh token valid here
    (``strict_rotation(False)``), so the next run completes."""
    stack.identity.set_token_lifetime(60)
    stack.identity.strict_rotation(False)
    stack.consent()
    vault = proxies.vault()
    vault.add(Rule(rb"PUT /secrets/", cut="s2c", after=0, times=None))
    env = proxies.env(fresh) | {"MAIL2BLOB_AFTER": "move:Archive"}
    outcome = seeded(stack, env)
    before = stack.dovecot.fetch_all()
    first = outcome.drain()
    assert first.error_kind == "TokenStoreError" and "Key Vault" in first.error
    assert stack.dovecot.fetch_all() == before and stored_prefixes(env) == set()
    vault.clear()
    outcome.settle("fault", "Key Vault cut: every token write", vault.fired(), recover=False)


# -- Exchange Online behaviour injected through the IMAP proxy ----------------------------------


def test_exchange_throttling_backs_off_for_the_suggested_time(stack, fresh, proxies):
    imap = proxies.imap()
    reply = px.THROTTLED.replace(b"{ms}", b"700")
    imap.add(Rule(px.IMAP_FETCH_BODY, action="reply", reply=reply, times=2))
    outcome = seeded(stack, proxies.env(fresh) | {"MAIL2BLOB_AFTER": "seen"})
    outcome.drain(batch_messages=20)
    assert imap.fired() == 2
    assert outcome.sleeps.count(0.7) == 2, outcome.sleeps
    outcome.settle("fault", "Exchange: Request is throttled (700 ms)", imap.fired())


def test_exchange_throttling_beyond_the_attempts_stops_clearly(stack, fresh, proxies):
    imap = proxies.imap()
    reply = px.THROTTLED.replace(b"{ms}", b"100")
    imap.add(Rule(px.IMAP_FETCH_BODY, action="reply", reply=reply, times=4))
    outcome = seeded(stack, proxies.env(fresh) | {"MAIL2BLOB_AFTER": "seen"})
    first = outcome.drain(batch_messages=20)
    assert first.error_kind == "SourceThrottledError" and "throttled" in first.error
    outcome.settle("fault", "Exchange: throttled 4 times in a row", imap.fired(), recover=False)


def test_access_token_expired_bye_refreshes_and_reconnects(stack, fresh, proxies):
    imap = proxies.imap()
    imap.add(Rule(px.IMAP_FETCH_BODY, action="reply", reply=px.BYE_TOKEN_EXPIRED, close=True))
    outcome = seeded(stack, proxies.env(fresh) | {"MAIL2BLOB_AFTER": "move:Archive"})
    refreshes = stack.identity.count("refresh_token")
    versions = len(stack.keyvault.versions("mail2blob-token-cache"))
    outcome.drain(batch_messages=20)
    assert imap.fired() == 1
    assert stack.identity.count("refresh_token") == refreshes + 1  # forced, though not expiring
    assert len(stack.keyvault.versions("mail2blob-token-cache")) == versions + 1
    outcome.settle("fault", "Exchange: BYE AccessTokenExpired", imap.fired())


# -- Key Vault and the identity platform failing -------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fault"),
    [
        ("429 with Retry-After", {"n": 2, "status": 429, "retry_after": 1}),
        ("500", {"n": 2, "status": 500, "retry_after": None}),
    ],
)
def test_key_vault_transient_failures_are_retried(stack, fresh, kind, fault):
    stack.keyvault.fail_next(**fault, path_contains="/secrets/")
    outcome = seeded(stack, fresh | {"MAIL2BLOB_AFTER": "seen"})
    outcome.drain()
    served = [r for r in stack.keyvault.log if r.status == fault["status"]]
    assert len(served) == fault["n"]
    outcome.settle("fault", f"Key Vault {kind}", fault["n"])


@pytest.mark.usefixtures("fast_sdk_retries")
def test_key_vault_failing_beyond_the_retries_stops_clearly(stack, fresh):
    stack.keyvault.fail_next(4, 500, retry_after=None, path_contains="/secrets/")  # 1 + 3 retries
    outcome = seeded(stack, fresh | {"MAIL2BLOB_AFTER": "seen"})
    first = outcome.drain()
    assert first.error_kind == "TokenStoreError" and "Key Vault" in first.error
    assert stored_prefixes(outcome.env) == set()
    outcome.settle("fault", "Key Vault 500, every retry", 4, recover=False)


def test_key_vault_hanging_times_out_and_is_retried(stack, fresh, monkeypatch):
    from mail2blob import clients

    monkeypatch.setattr(clients, "HTTP_READ_TIMEOUT", 2)
    stack.keyvault.delay_next(1, 6, path_contains="/secrets/")
    outcome = seeded(stack, fresh | {"MAIL2BLOB_AFTER": "seen"})
    outcome.drain()
    outcome.settle("fault", "Key Vault hangs (read timeout)", 1)


@pytest.mark.parametrize(
    ("kind", "fault"),
    [
        ("token 429 with Retry-After", {"n": 1, "status": 429, "retry_after": 1}),
        ("token 500", {"n": 2, "status": 500}),
        ("discovery 500", {"n": 1, "status": 500, "path_contains": "openid-configuration"}),
    ],
)
def test_identity_transient_failures_are_retried(stack, fresh, monkeypatch, kind, fault):
    if fault["status"] != 429:  # a 429's Retry-After (1 s) is longer: keep the real backoff
        monkeypatch.setattr(tokens, "TOKEN_BACKOFF_S", 0.2)
    stack.identity.set_token_lifetime(60)  # the run has to refresh
    stack.consent()
    stack.identity.fail_next(**fault)
    outcome = seeded(stack, fresh | {"MAIL2BLOB_AFTER": "seen"})
    outcome.drain()
    outcome.settle("fault", f"identity platform {kind}", fault["n"])


def test_identity_hanging_times_out_and_is_retried(stack, fresh, proxies, monkeypatch):
    from mail2blob import tls

    monkeypatch.setattr(tls, "HTTP_TIMEOUT", (2, 2))
    stack.identity.set_token_lifetime(60)
    stack.consent()
    identity = proxies.identity()
    identity.add(Rule(rb"POST /[^ ]+/oauth2/v2\.0/token", action="stall"))
    outcome = seeded(stack, proxies.env(fresh) | {"MAIL2BLOB_AFTER": "seen"})
    outcome.drain()
    assert identity.fired() == 1
    outcome.settle("fault", "identity platform hangs (timeout)", 1)


def test_identity_unreachable_stops_clearly(stack, fresh, proxies, monkeypatch):
    monkeypatch.setattr(tokens, "TOKEN_BACKOFF_S", 0.2)
    stack.identity.set_token_lifetime(60)
    stack.consent()
    identity = proxies.identity()
    identity.refuse()
    outcome = seeded(stack, proxies.env(fresh) | {"MAIL2BLOB_AFTER": "seen"})
    first = outcome.drain()
    assert first.error_kind == "TokenError" and "could not be reached" in first.error
    identity.refuse(False)
    outcome.settle("fault", "identity platform unreachable", 1, recover=False)


# -- Dovecot restarted, Azurite stopped, mid-run -------------------------------------------------


def _in_background(outcome: Outcome, **options) -> threading.Thread:
    thread = threading.Thread(target=outcome.drain, kwargs=options, name="drain", daemon=True)
    thread.start()
    return thread


def _wait_for_blobs(env: dict[str, str], count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    container = container_of(env)
    mailbox = env["MAIL2BLOB_MAILBOX"]
    while blob_count(container, mailbox) < count:
        assert time.monotonic() < deadline, f"fewer than {count} blobs after {timeout} s"
        time.sleep(0.02)


def test_dovecot_restarted_mid_run(stack, fresh):
    outcome = seeded(stack, fresh | {"MAIL2BLOB_AFTER": "move:Archive"}, count=200)
    drain = _in_background(outcome, batch_messages=10)
    _wait_for_blobs(outcome.env, 30)
    stack.dovecot.restart()
    drain.join(120)
    reconnects = [s for s in outcome.sleeps if s in (0.5, 1.0, 2.0)]
    assert reconnects, outcome.sleeps
    outcome.settle("fault", "Dovecot restarted mid-run", 1)


@pytest.fixture
def disk_azurite(tmp_path_factory, monkeypatch):
    """A separate Azurite that keeps its data on disk across stop/start (the session's runs in
    memory and would lose everything). ``Azurite`` always passes ``--inMemoryPersistence``; a
    wrapper drops it, so Azurite persists to its working directory."""
    from tests.stack import azurite as azurite_module

    folder = tmp_path_factory.mktemp("disk-azurite")
    wrapper = folder / "azurite-on-disk"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a; do shift; [ "$a" = --inMemoryPersistence ] || set -- "$@" "$a"; done\n'
        f'exec "{azurite_module.AZURITE_BIN}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(azurite_module, "AZURITE_BIN", wrapper)
    server = azurite_module.Azurite(folder / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.usefixtures("fast_sdk_retries")
def test_azurite_stopped_mid_run(stack, fresh, disk_azurite):
    """Storage goes away for longer than the SDK retries: the run stops with a clear error;
    once storage is back, the next run completes."""
    container = disk_azurite.fresh_container("mail")
    env = fresh | {
        "MAIL2BLOB_STORAGE": disk_azurite.connection_string,
        "MAIL2BLOB_CONTAINER": container,
        "MAIL2BLOB_AFTER": "delete",
    }
    outcome = seeded(stack, env, count=100)
    drain = _in_background(outcome, batch_messages=10)
    _wait_for_blobs(env, 20)
    disk_azurite.stop()
    deadline = time.monotonic() + 60
    while outcome.current.result.error is None and drain.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    disk_azurite.start()  # back before the stopped run records its result and ends its lease
    drain.join(120)
    first = outcome.runs[0]
    assert first.error_kind == "DestinationError", first.error
    assert "blob storage" in first.error or "checkpoint" in first.error
    break_lease(env)
    outcome.settle("fault", "Azurite stopped mid-run", 1, recover=False)


# -- two drains of one mailbox at once ------------------------------------------------------------


def test_two_drains_at_once_duplicate_and_lose_nothing(stack, fresh, tmp_path):
    """Two command-line drains and the engine's entry point (what the timer and queue functions
    call) started together: one holds the lease, the others stop at once (exit status 4)."""
    env = fresh | {"MAIL2BLOB_AFTER": "move:Archive"}
    outcome = seeded(stack, env, count=250, seed=33)
    env_file = write_env_file(tmp_path / "env", env)
    children = [start_drain_child(env_file) for _ in range(2)]
    in_process = drain_mailbox(Settings.from_env(env))
    codes = [child_result(child)[0] for child in children]
    busy = codes.count(4) + (in_process.error_kind == "DrainBusyError")
    assert set(codes) <= {0, 4} and in_process.error_kind in (None, "DrainBusyError"), (
        codes,
        in_process.error,
    )
    assert busy >= 1
    outcome.runs.append(in_process)
    outcome.settle(
        "fault",
        "two CLI drains + one in-process drain at once",
        busy,
        recover=False,
        note=f"{busy} of 3 drains found the mailbox busy",
    )
