"""``python -m mail2blob consent`` end to end: the command runs as a subprocess against the local
stack and the test plays the browser (requests) at the address it prints; and the device code
flow, where the test approves the printed code at the identity stand-in."""

from __future__ import annotations

import html
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msal
import pytest
import requests

from mail2blob.cli import EXIT_FAILED, EXIT_OK, EXIT_SETTINGS, build_parser
from tests.stack import constants as c
from tests.stack.dovecot import free_port
from tests.test_consent import consent_env

ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME = "mail2blob-token-cache"


class Command:
    """The consent command as a child process whose stdout is read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mail2blob", "consent", *args],
            cwd=ROOT,
            env=env or dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._err: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self.lines.put)),
            threading.Thread(target=self._pump, args=(self.process.stderr, self._err.append)),
        ]
        for pump in self._pumps:
            pump.daemon = True
            pump.start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line)

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if match := regex.search(line):
                return match
        raise AssertionError(
            f"no line matching {pattern!r}; stdout {self.seen!r}, stderr {''.join(self._err)!r}"
        )

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        """Wait for the exit: (status, all of stdout, all of stderr)."""
        code = self.process.wait(timeout=timeout)
        for pump in self._pumps:
            pump.join(timeout=5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, "".join(self.seen), "".join(self._err)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def env(stack, monkeypatch) -> dict[str, str]:
    """The whole process environment for the child: the settings plus the managed identity."""
    consent_env(stack, monkeypatch)
    return dict(os.environ)


@pytest.fixture
def commands() -> Iterator[list[Command]]:
    started: list[Command] = []
    yield started
    for command in started:
        command.kill()


def public_env(monkeypatch) -> dict[str, str]:
    """A public client: no secret, no federated credential (device code, any localhost port)."""
    monkeypatch.setenv("MAIL2BLOB_CLIENT_ID", c.PUBLIC_CLIENT_ID)
    monkeypatch.delenv("MAIL2BLOB_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("MAIL2BLOB_FIC_CLIENT_ID", raising=False)
    return dict(os.environ)


def browser() -> requests.Session:
    """The test's browser: no proxies from the environment, trusts nothing it does not need."""
    session = requests.Session()
    session.trust_env = False
    return session


def sign_in(stack, authorize_url: str, user: str) -> tuple[str, dict[str, str]]:
    """Approve at the identity stand-in; the form_post page's target and fields."""
    return stack.sign_in(authorize_url, user)


def cached_account(stack) -> str | None:
    serialized = stack.keyvault.value(SECRET_NAME)
    if serialized is None:
        return None
    cache = msal.SerializableTokenCache()
    cache.deserialize(serialized)
    return next(iter(cache.search(msal.TokenCache.CredentialType.ACCOUNT)))["username"]


def port_is_closed(port: int) -> bool:
    try:
        browser().get(f"http://127.0.0.1:{port}/start", timeout=2)
    except requests.ConnectionError:
        return True
    return False


# ---------------------------------------------------------------------------- browser flow


def test_browser_flow_end_to_end(stack, env, commands):
    port = free_port()
    stack.identity.add_redirect_uri(c.CLIENT_ID, f"http://localhost:{port}/")
    command = Command("--no-browser", "--port", str(port), "--timeout", "60", env=env)
    commands.append(command)
    start_url = command.wait_for(r"^\s+(http://localhost:\d+/start)\s*$").group(1)
    assert start_url == f"http://localhost:{port}/start"

    http = browser()
    assert http.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 400  # not an answer
    assert http.get(f"http://127.0.0.1:{port}/favicon.ico", timeout=5).status_code == 404
    redirect = http.get(start_url, allow_redirects=False, timeout=5)
    assert redirect.status_code == 302
    assert redirect.headers["Referrer-Policy"] == "no-referrer"
    authorize = redirect.headers["Location"]
    assert "response_mode=form_post" in authorize
    assert f"redirect_uri=http%3A%2F%2Flocalhost%3A{port}%2F" in authorize

    action, fields = sign_in(stack, authorize, c.MAILBOX)
    assert action == f"http://localhost:{port}/"
    # A forged answer is turned away and the listener keeps waiting for the real one.
    forged = http.post(action, data=dict(fields, state="forged"), timeout=10)
    assert forged.status_code == 400 and 'data-outcome="state_mismatch"' in forged.text
    assert cached_account(stack) is None

    page = http.post(action, data=fields, timeout=30)
    assert page.status_code == 200, page.text
    assert 'data-outcome="saved"' in page.text
    assert page.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]

    code, out, err = command.finish()
    assert code == EXIT_OK, err
    assert f"Consent saved for {c.MAILBOX} (signed in as {c.MAILBOX})" in out
    assert "The next scheduled drain runs at" in out
    for value in (fields["code"], fields["state"], c.CLIENT_SECRET):
        assert value not in out and value not in err
    assert "state=" not in out  # the terminal shows the local /start address only
    assert cached_account(stack) == c.MAILBOX
    assert port_is_closed(port)  # one-shot: the listener stopped


def test_public_client_on_a_free_port_wrong_account_stores_nothing(
    stack, env, commands, monkeypatch
):
    command = Command("--no-browser", "--port", "0", "--timeout", "60", env=public_env(monkeypatch))
    commands.append(command)
    start_url = command.wait_for(r"^\s+(http://localhost:\d+/start)\s*$").group(1)
    authorize = browser().get(start_url, allow_redirects=False, timeout=5).headers["Location"]
    action, fields = sign_in(stack, authorize, c.OTHER_USER)
    page = browser().post(action, data=fields, timeout=30)
    assert page.status_code == 403 and 'data-outcome="login_refused"' in page.text
    assert "python -m mail2blob consent` again" in html.unescape(page.text)

    code, _, err = command.finish()
    assert code == EXIT_FAILED
    assert "The mailbox refused the sign-in" in err
    assert c.OTHER_USER in err and c.MAILBOX in err
    assert cached_account(stack) is None


def test_timeout_stops_cleanly_and_stores_nothing(stack, env, monkeypatch, capsys):
    public_env(monkeypatch)
    args = build_parser().parse_args(["consent", "--no-browser", "--port", "0", "--timeout", "0.5"])
    started = time.monotonic()
    assert args.func(args) == EXIT_FAILED
    assert time.monotonic() - started < 60  # it stopped (a hang would run until the test timeout)
    out, err = capsys.readouterr()
    port = int(re.search(r"http://localhost:(\d+)/start", out).group(1))
    assert "no answer from the sign-in within 0.5 s; nothing was stored" in err
    assert port_is_closed(port)
    assert cached_account(stack) is None


def test_port_in_use_is_a_usage_error(stack, env, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = build_parser().parse_args(["consent", "--no-browser", "--port", str(port)])
        assert args.func(args) == EXIT_SETTINGS
    assert f"cannot listen on localhost port {port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------- device code


def test_device_code_end_to_end(stack, env, commands, monkeypatch):
    command = Command("--device-code", "--timeout", "60", env=public_env(monkeypatch))
    commands.append(command)
    match = command.wait_for(r"open the page (\S+) and enter the code (\w+)")
    assert match.group(1).endswith("/devicelogin")
    assert cached_account(stack) is None
    stack.identity.approve_device_code(match.group(2), c.MAILBOX)
    code, out, err = command.finish()
    assert code == EXIT_OK, err
    assert f"Consent saved for {c.MAILBOX}" in out
    assert cached_account(stack) == c.MAILBOX


def test_device_code_declined(stack, env, commands, monkeypatch):
    command = Command("--device-code", "--timeout", "60", env=public_env(monkeypatch))
    commands.append(command)
    user_code = command.wait_for(r"enter the code (\w+)").group(1)
    stack.identity.decline_device_code(user_code)
    code, _, err = command.finish()
    assert code == EXIT_FAILED
    assert "AADSTS65004" in err and "declined consent" in err
    assert cached_account(stack) is None


def test_device_code_needs_a_public_client(stack, env, capsys):
    args = build_parser().parse_args(["consent", "--device-code"])
    assert args.func(args) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "Allow public client flows" in err and "MAIL2BLOB_CLIENT_SECRET" in err
    assert c.CLIENT_SECRET not in err
