"""Session fixtures of the local stack. Each part lives in ``tests/stack/`` with its own fixture;
this file only registers them and provides the pieces they share."""

from __future__ import annotations

import os

import pytest

from tests.stack.certs import TestCA
from tests.stack.signing import SigningKey

pytest_plugins = [
    "tests.stack.dovecot",
    "tests.stack.azurite",
    "tests.stack.identity",
    "tests.stack.keyvault",
]


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey()


@pytest.fixture(scope="session")
def stack(test_ca, signing_key, dovecot, azurite, identity, keyvault):
    """The whole local stack, with the process environment of a Function App that has a
    user-assigned managed identity (IDENTITY_ENDPOINT/HEADER, AZURE_CLIENT_ID)."""
    from tests.stack.local_stack import Stack

    s = Stack(test_ca, signing_key, dovecot, azurite, identity, keyvault)
    saved = {k: os.environ.get(k) for k in s.azure_env()}
    os.environ.update(s.azure_env())
    yield s
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def fresh(stack, monkeypatch):
    """A clean slate for one test: empty mailbox, a new container, stand-ins reset, a consented
    token cache in the vault, and the settings in the environment. Returns the settings env."""
    stack.dovecot.delete_all()
    stack.identity.reset()
    stack.keyvault.reset()
    container = stack.azurite.fresh_container("mail")
    env = stack.env(container=container)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stack.consent()
    return env
