"""Secrets never leave where they belong: every flow (web consent with a client secret and with a
federated credential, the command-line consent, drains that refresh and rotate tokens or are told
their token expired, consent that fails, drains that fail, status) runs with logging at DEBUG for
every library, and no access token, refresh token, ID token, authorization code, PKCE verifier,
client secret, client assertion or managed identity secret may appear in any log record, exception
text, page, or the command line's output.

Besides the known values, anything shaped like a JWT (access and ID tokens, client assertions,
managed identity tokens) counts as a leak.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import msal
import pytest

from mail2blob import clients
from mail2blob.consent import BlobFlowStore
from mail2blob.drain import drain_mailbox
from mail2blob.settings import Settings
from tests.mailgen import make_messages
from tests.reliability import proxy as px
from tests.reliability.harness import child_environment, write_env_file
from tests.reliability.proxy import Rule
from tests.stack import constants as c
from tests.stack.dovecot import free_port
from tests.test_consent import (
    SECRET_NAME,
    begin,
    callback,
    consent_env,
    page,
    sign_in,
)
from tests.test_consent import (
    functions as app_functions,  # noqa: F401 - fixture: the Function App's functions
)
from tests.test_consent_cli import Command, browser
from tests.test_consent_cli import sign_in as cli_sign_in

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
ROOT = Path(__file__).resolve().parents[2]


class Evidence:
    """Everything a flow showed: log records (with exception texts), pages, outputs; and every
    secret the stack handed out."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.texts: list[tuple[str, str]] = []
        self.secrets: dict[str, str] = {
            "client secret": c.CLIENT_SECRET,
            "managed identity header": stack.identity.identity_header,
        }

    def add_text(self, where: str, text: str | None) -> None:
        if text:
            self.texts.append((where, text))

    def add_secret(self, label: str, value: str | None) -> None:
        if value:
            self.secrets[f"{label} #{len(self.secrets)}"] = value

    def collect_token_caches(self, *names: str) -> None:
        """Every token in every version of the vault's token caches."""
        for name in names:
            for version in self.stack.keyvault.versions(name):
                cache = msal.SerializableTokenCache()
                cache.deserialize(self.stack.keyvault.value(name, version))
                for label, kind in (
                    ("access token", msal.TokenCache.CredentialType.ACCESS_TOKEN),
                    ("refresh token", msal.TokenCache.CredentialType.REFRESH_TOKEN),
                    ("ID token", msal.TokenCache.CredentialType.ID_TOKEN),
                ):
                    for item in cache.search(kind):
                        self.add_secret(label, item["secret"])

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.texts:
            for label, value in self.secrets.items():
                if value in text:
                    found.append(f"{label} in {where}")
            for match in JWT.finditer(text):
                found.append(f"a JWT ({match.group(0)[:12]}...) in {where}")
        return found


def record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    return text


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("msal", "azure", "urllib3", "requests", "imapclient", "mail2blob", "functions"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def web_consent(stack, functions, evidence: Evidence, user: str = c.MAILBOX) -> str:
    """One consent through the HTTP functions; returns the outcome page."""
    flow_id, authorize = begin(functions)
    stored = BlobFlowStore(clients.container_client(Settings.from_env())).load(flow_id)
    evidence.add_secret("PKCE verifier", stored.record["flow"].get("code_verifier"))
    evidence.add_secret("consent cookie", flow_id)
    fields = sign_in(stack, authorize, user)
    evidence.add_secret("authorization code", fields.get("code"))
    answer = page(callback(functions, fields, flow_id))
    evidence.add_text(f"consent page ({user})", answer)
    replay = page(callback(functions, fields, flow_id))
    evidence.add_text("replayed consent page", replay)
    return answer


def test_no_secret_in_any_log_record_exception_or_page(
    stack,
    app_functions,  # noqa: F811 - the fixture imported above
    monkeypatch,
    proxies,
    debug_logs,
    tmp_path,
):
    functions = app_functions
    evidence = Evidence(stack)
    env = consent_env(stack, monkeypatch)
    stack.identity.set_token_lifetime(60)  # every drain refreshes (and rotates) the token

    # consent: accepted, refused by IMAP (wrong account), refused at sign-in
    assert 'data-outcome="saved"' in web_consent(stack, functions, evidence)
    assert 'data-outcome="login_refused"' in web_consent(stack, functions, evidence, c.OTHER_USER)
    _flow_id, authorize = begin(functions)
    stack.identity.auto_refuse()
    denied = stack.msal_session().get(authorize, allow_redirects=False, timeout=10).text
    stack.identity.interactive()
    evidence.add_text("denied consent page", denied)

    # drains: refresh and rotation; a BYE AccessTokenExpired (forced refresh) through the proxy
    stack.dovecot.delete_all()
    stack.dovecot.append_many(make_messages(20, seed=44, size_kb=4))
    imap = proxies.imap()
    imap.add(Rule(px.IMAP_FETCH_BODY, action="reply", reply=px.BYE_TOKEN_EXPIRED, close=True))
    for key, value in proxies.env(env).items():
        monkeypatch.setenv(key, value)
    result = drain_mailbox(Settings.from_env(), progress=None)
    evidence.add_text("drain result", str(result.to_dict()))
    assert result.ok and result.stored == 20 and imap.fired() == 1, result.error

    # federated credential (client assertion from the managed identity): consent and drain
    monkeypatch.delenv("MAIL2BLOB_CLIENT_SECRET")
    monkeypatch.setenv("MAIL2BLOB_FIC_CLIENT_ID", c.MI_CLIENT_ID)
    assert 'data-outcome="saved"' in web_consent(stack, functions, evidence)
    stack.dovecot.append_many(make_messages(3, seed=45, size_kb=4))
    fic = drain_mailbox(Settings.from_env())
    evidence.add_text("federated drain result", str(fic.to_dict()))
    assert fic.ok and fic.stored == 3, fic.error

    # failures: a wrong client secret, then a revoked grant
    monkeypatch.delenv("MAIL2BLOB_FIC_CLIENT_ID")
    monkeypatch.setenv("MAIL2BLOB_CLIENT_SECRET", c.CLIENT_SECRET + "-wrong")
    evidence.add_secret("wrong client secret", c.CLIENT_SECRET + "-wrong")
    wrong = drain_mailbox(Settings.from_env())
    assert wrong.error_kind == "TokenError", wrong.error
    evidence.add_text("wrong-secret drain error", wrong.error)
    monkeypatch.setenv("MAIL2BLOB_CLIENT_SECRET", c.CLIENT_SECRET)
    stack.identity.revoke(c.MAILBOX)
    revoked = drain_mailbox(Settings.from_env())
    assert revoked.error_kind == "ConsentNeededError", revoked.error
    evidence.add_text("revoked drain error", revoked.error)

    # the command line, verbose: consent (localhost listener), drain, status
    texts = cli_flows(stack, evidence, tmp_path)
    for where, text in texts:
        evidence.add_text(where, text)

    for record in debug_logs.records:
        evidence.add_text(f"log record {record.name}:{record.levelname}", record_text(record))
    evidence.collect_token_caches(SECRET_NAME)
    assert any(r.name.startswith("msal") for r in debug_logs.records)  # DEBUG was captured
    assert sum("refresh token" in label for label in evidence.secrets) >= 4
    leaks = evidence.leaks()
    assert not leaks, sorted(set(leaks))
    # the check itself catches what it looks for
    planted = Evidence(stack)
    planted.secrets = dict(evidence.secrets)
    planted.add_text(
        "planted", f"token={next(v for k, v in evidence.secrets.items() if 'access' in k)}"
    )
    assert len(planted.leaks()) == 2  # by value and by shape


def cli_flows(stack, evidence: Evidence, tmp_path) -> list[tuple[str, str]]:
    """``consent`` (the test plays the browser), ``drain`` and ``status``, all ``--verbose``."""
    outputs: list[tuple[str, str]] = []
    port = free_port()
    stack.identity.add_redirect_uri(c.CLIENT_ID, f"http://localhost:{port}/")
    command = Command("--no-browser", "--port", str(port), "--timeout", "60", env=dict(os.environ))
    try:
        start_url = command.wait_for(r"^\s+(http://localhost:\d+/start)\s*$").group(1)
        redirect = browser().get(start_url, allow_redirects=False, timeout=10)
        action, fields = cli_sign_in(stack, redirect.headers["Location"], c.MAILBOX)
        evidence.add_secret("authorization code (CLI)", fields.get("code"))
        outputs.append(("CLI consent page", browser().post(action, data=fields, timeout=30).text))
        code, out, err = command.finish()
    finally:
        command.kill()
    assert code == 0, err
    outputs += [("CLI consent stdout", out), ("CLI consent stderr", err)]

    settings_env = {k: v for k, v in os.environ.items() if k.startswith("MAIL2BLOB_")}
    env_file = write_env_file(tmp_path / "env", settings_env)
    for args in (["drain", "--json"], ["status", "--json"]):
        run = subprocess.run(
            [sys.executable, "-m", "mail2blob", "--env-file", str(env_file), "--verbose", *args],
            capture_output=True,
            text=True,
            env=child_environment(),
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert " DEBUG " in run.stderr  # it really logged at DEBUG
        outputs += [(f"CLI {args[0]} stdout", run.stdout), (f"CLI {args[0]} stderr", run.stderr)]
    return outputs
