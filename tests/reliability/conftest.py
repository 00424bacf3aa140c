"""Fixtures of the reliability suite (proxies in front of each server) and the figures printed at
the end of the session: a table, then the machine-readable line as the very last line."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability import report
from tests.reliability.proxy import Proxy, client_context, server_context

#: Also writes the figures as Markdown to this file (to refresh the README's "Reliability").
REPORT_FILE_ENV = "MAIL2BLOB_RELIABILITY_REPORT"
#: Set by `make reliability`: print the machine-readable line as the output's very last line.
LAST_LINE_ENV = "MAIL2BLOB_RELIABILITY_LAST_LINE"


class Proxies:
    """Starts proxies in front of the stack's servers and gives the settings that route the
    engine through them. ``env()`` overrides a settings dict for every proxy started so far."""

    def __init__(self, stack, tls_server, tls_client) -> None:
        self.stack = stack
        self._tls_server = tls_server
        self._tls_client = tls_client
        self._started: list[Proxy] = []
        self._overrides: dict[str, str] = {}

    def _start(self, proxy: Proxy) -> Proxy:
        proxy.start()
        self._started.append(proxy)
        return proxy

    def imap(self) -> Proxy:
        d = self.stack.dovecot
        proxy = self._start(
            Proxy(
                d.host,
                d.port,
                tls_server=self._tls_server,
                tls_upstream=self._tls_client,
                name="imap-proxy",
            )
        )
        self._overrides["MAIL2BLOB_IMAP_PORT"] = str(proxy.port)
        return proxy

    def blob(self, azurite=None) -> Proxy:
        azurite = azurite or self.stack.azurite
        proxy = self._start(Proxy(azurite.host, azurite.blob_port, name="blob-proxy"))
        self._overrides["MAIL2BLOB_STORAGE"] = azurite.connection_string.replace(
            azurite.endpoint("blob"), f"http://{proxy.endpoint}/devstoreaccount1"
        )
        return proxy

    def vault(self) -> Proxy:
        kv = self.stack.keyvault
        proxy = self._start(
            Proxy(
                "127.0.0.1",
                kv.port,
                tls_server=self._tls_server,
                tls_upstream=self._tls_client,
                name="vault-proxy",
            )
        )
        self._overrides["MAIL2BLOB_KEY_VAULT_URL"] = f"https://{proxy.endpoint}"
        return proxy

    def identity(self) -> Proxy:
        """In front of the identity platform's HTTPS endpoints; the discovery document is
        rewritten so MSAL's token requests come through the proxy too."""
        ident = self.stack.identity
        proxy = self._start(
            Proxy(
                "127.0.0.1",
                ident.port,
                tls_server=self._tls_server,
                tls_upstream=self._tls_client,
                name="identity-proxy",
            )
        )
        old, new = f"127.0.0.1:{ident.port}".encode(), proxy.endpoint.encode()
        assert len(old) == len(new), "the rewrite must keep Content-Length right"
        proxy.rewrite(re.escape(old), new)
        self._overrides["MAIL2BLOB_AUTHORITY"] = ident.authority.replace(
            f"127.0.0.1:{ident.port}", proxy.endpoint
        )
        return proxy

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, **self._overrides}

    def close(self) -> None:
        for proxy in reversed(self._started):
            proxy.stop()


@pytest.fixture(scope="session")
def proxy_tls(test_ca):
    cert, key = test_ca.issue("reliability-proxy", ("127.0.0.1", "localhost"))
    return server_context(str(cert), str(key)), client_context(str(test_ca.ca_cert_path))


@pytest.fixture
def proxies(stack, proxy_tls) -> Iterator[Proxies]:
    factory = Proxies(stack, *proxy_tls)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def fast_sdk_retries(monkeypatch) -> None:
    """Shorter waits between the Azure SDKs' retries, so a fault scenario takes seconds: the
    storage SDK waits 15 + 3^n s (18, 24, 42 s) before its n-th retry, here 0.2 + 1.2^n s (sync
    and ``azure.storage.blob.aio`` policies); azure-core (Key Vault) 0.8 * 2^n s, here 0.1 * 2^n s
    (a ``Retry-After`` is still obeyed). What is retried, and how often, is unchanged."""
    from azure.core.pipeline.policies._retry import RetryPolicyBase
    from azure.storage.blob._shared import policies, policies_async

    for cls in (policies.ExponentialRetry, policies_async.ExponentialRetry):
        monkeypatch.setattr(cls, "__init__", _faster(cls.__init__))
    core_init = RetryPolicyBase.__init__

    def core_faster(self, **kwargs):
        kwargs.setdefault("retry_backoff_factor", 0.1)
        core_init(self, **kwargs)

    monkeypatch.setattr(RetryPolicyBase, "__init__", core_faster)


def _faster(original):
    def init(self, initial_backoff=0.2, increment_base=1.2, random_jitter_range=0.2, **kwargs):
        original(
            self,
            initial_backoff=initial_backoff,
            increment_base=increment_base,
            random_jitter_range=random_jitter_range,
            **kwargs,
        )

    return init


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = report.rows()
    if not rows:
        return
    terminalreporter.section("reliability figures")
    for line in report.table(rows):
        terminalreporter.write_line(line)
    if not os.environ.get(LAST_LINE_ENV):
        # Inside the whole suite (make test) pytest's own closing line stays the last one.
        terminalreporter.write_line(report.machine_line(rows))
    target = os.environ.get(REPORT_FILE_ENV)
    if target:
        Path(target).write_text("\n".join(report.table(rows)) + "\n\n" + report.machine_line())


def pytest_unconfigure(config) -> None:
    # `make reliability`: after pytest's own "N passed in S s" line, so the figures are the
    # output's last line.
    rows = report.rows()
    if rows and os.environ.get(LAST_LINE_ENV):
        config.get_terminal_writer().line(report.machine_line(rows))
