"""Crash injection: ``python -m mail2blob drain`` killed with SIGKILL at seeded random moments,
again and again, until a run completes; after every kill the promises are checked against what
the killed run left behind (checkpoint never ahead of storage, no post-action on an unstored
message), and at the end every message must be stored exactly once, byte for byte.

A SIGKILLed drain cannot release its lease on the mailbox; the lease would expire after 60 s.
The harness breaks it instead (what the expiry does, without the wait).

``MAIL2BLOB_RELIABILITY_SCALE`` (default 1) multiplies messages and kills for a longer run.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import threading
import time
import zlib
from collections import Counter

import pytest

from tests.mailgen import make_messages
from tests.reliability import proxy as px
from tests.reliability import report
from tests.reliability.harness import (
    Served,
    break_lease,
    checkpoint_ahead,
    child_result,
    final_mailbox_problems,
    load_checkpoint,
    start_drain_child,
    stored_prefixes,
    verify_storage,
    write_env_file,
    wrong_post_actions,
)

SCALE = float(os.environ.get("MAIL2BLOB_RELIABILITY_SCALE", "1"))
MESSAGES = int(800 * SCALE)
KILLS = int(15 * SCALE)
MODES = ["keep", "move:Archive", "delete"]
#: Where a run is killed, and how often each is chosen. The drain reaches IMAP and Blob Storage
#: through the proxies, which see every upload, checkpoint write and post-action command, so a
#: kill lands exactly there (or a few milliseconds later); start-up kills (token refresh, IMAP
#: login, lease, checkpoint read) are timed.
PLANS = {"start-up": 0.2, "upload": 0.55, "checkpoint write": 0.1, "post-action": 0.15}
STARTUP_WINDOW = (0.1, 1.2)
TRIGGERS = {
    "upload": ("blob", px.BLOB_MESSAGE_PUT),
    "checkpoint write": ("blob", px.BLOB_CHECKPOINT_PUT),
    "post-action": ("imap", px.IMAP_POST_ACTION),
}


class Killer:
    """Starts the drain child and SIGKILLs it at a seeded random point."""

    def __init__(self, env_file, seed: int, after: str, proxies: dict[str, px.Proxy]) -> None:
        self.rng = random.Random(seed)
        self.env_file = env_file
        self.after = after
        self.proxies = proxies
        self.kills: Counter[str] = Counter()

    def run(self, stored: int, kills_left: int) -> subprocess.Popen[str] | None:
        """One child run; returns it when it finished by itself, ``None`` when it was killed."""
        process = start_drain_child(self.env_file)
        if kills_left <= 0:
            process.wait(timeout=180)
            return process
        plan = self.rng.choices(list(PLANS), list(PLANS.values()))[0]
        if plan == "post-action" and self.after == "keep":
            plan = "upload"
        if plan == "start-up":
            try:
                process.wait(timeout=self.rng.uniform(*STARTUP_WINDOW))
                return process
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        else:
            self._kill_at(process, plan, stored, kills_left)
        if process.returncode != -signal.SIGKILL:
            return process
        process.communicate()
        self.kills[plan] += 1
        return None

    def _kill_at(self, process: subprocess.Popen[str], plan: str, stored: int, left: int) -> None:
        """Kill at the n-th occurrence of the plan's request or command, now or a moment later
        (while the server answers)."""
        if plan == "upload":
            nth = self.rng.randint(1, max(1, 2 * (MESSAGES - stored) // (left + 1)))
        else:  # the first of the run: a later one may not come (few batches left)
            nth = 1
        delay = self.rng.choice([0.0, 0.0, self.rng.uniform(0.001, 0.05)])
        seen = itertools.count(1)

        def on_match(_match) -> None:
            if next(seen) == nth:
                threading.Timer(delay, process.kill).start()

        proxy_name, trigger = TRIGGERS[plan]
        proxy = self.proxies[proxy_name]
        proxy.add(px.Rule(trigger, action="notify", times=None, callback=on_match))
        try:
            process.wait(timeout=180)
        finally:
            proxy.clear()


@pytest.mark.parametrize("after", MODES)
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    stack, fresh, proxies, tmp_path, after
):
    seed = zlib.crc32(after.encode())
    # Every run refreshes the access token and saves the rotated refresh token, so start-up
    # kills land in that too. Entra keeps the old refresh token valid (non-strict rotation).
    stack.identity.set_token_lifetime(60)
    stack.identity.strict_rotation(False)
    stack.consent()
    stack.dovecot.append_many(make_messages(MESSAGES, seed=seed, size_kb=3))
    served = Served.snapshot(stack.dovecot)
    routes = {"imap": proxies.imap(), "blob": proxies.blob()}
    env = proxies.env(fresh) | {"MAIL2BLOB_AFTER": after}
    killer = Killer(write_env_file(tmp_path / "env", env), seed, after, routes)

    kills = stored = busy = 0
    ahead: set[int] = set()
    wrong: set[str] = set()
    failures: list[str] = []
    result: dict = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        process = killer.run(stored, KILLS - kills)
        if process is None:
            kills += 1
            break_lease(env)
            prefixes = stored_prefixes(env)
            stored = len(prefixes)
            ahead.update(checkpoint_ahead(env, served, prefixes))
            wrong.update(wrong_post_actions(stack.dovecot, served, after, prefixes))
            continue
        code, result, err = child_result(process)
        if code == 0 and result.get("complete"):
            break
        if code == 4 and busy < 3:  # a killed run's lease request landed after the break
            busy += 1
            break_lease(env)
            continue
        failures.append(f"exit {code}: {result.get('error') or err[-1500:]}")
        if len(failures) >= 3:
            break

    figures = verify_storage(env, list(served.bodies.values()))
    wrong.update(final_mailbox_problems(stack.dovecot, served, after))
    where = ", ".join(f"{n} at {plan}" for plan, n in killer.kills.most_common())
    report.record(
        "crash",
        f"SIGKILL, after={after}",
        injected=kills,
        expected=figures.expected,
        stored=figures.stored,
        duplicated=figures.duplicated + figures.unexpected,
        lost=figures.lost,
        wrong_post_actions=len(wrong) + len(ahead),
        note=f"{where}; seed {seed}",
    )
    assert not failures, failures
    assert result.get("complete") and result.get("ok"), result
    assert kills >= KILLS // 3  # a run that finishes before its kill point ends the series
    assert not ahead, f"checkpoint ahead of storage for uids {sorted(ahead)[:20]}"
    assert not wrong, sorted(wrong)[:20]
    assert (figures.lost, figures.duplicated, figures.unexpected, figures.misnamed) == (0, 0, 0, 0)
    state = load_checkpoint(env)["folders"]["INBOX"]
    assert state["failed"] == {}
    if after == "keep":  # with move/delete a killed run may have emptied the folder's tail
        assert state["last_uid"] == max(served.bodies)
