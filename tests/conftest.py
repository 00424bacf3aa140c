"""Session fixtures of the local stack. Each part lives in ``tests/stack/`` with its own fixture;
this file only registers them and provides the pieces they share."""

from __future__ import annotations

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
