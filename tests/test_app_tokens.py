"""App-only tokens (client credentials) through MSAL against the identity stand-in."""

from __future__ import annotations

import pytest

from mail2blob import clients, tokens
from mail2blob.errors import TokenError
from mail2blob.settings import Settings
from tests.stack import constants as c


@pytest.fixture
def app_settings(stack, fresh, monkeypatch) -> Settings:
    monkeypatch.setattr(tokens, "TOKEN_BACKOFF_S", 0.05)
    return Settings.from_env(fresh | {"MAIL2BLOB_AUTH_MODE": "app"})


def test_app_token_carries_the_app_role(stack, app_settings):
    token = clients.app_tokens(app_settings).access_token()
    claims = stack.signing_key.verify(token.token, audience=c.OUTLOOK_AUDIENCE)
    assert claims["roles"] == ["IMAP.AccessAsApp"] and token.app_only
    assert "preferred_username" not in claims


def test_transient_identity_failures_are_tried_again(stack, app_settings):
    app = clients.app_tokens(app_settings)
    app.access_token()  # discovery done; the next call asks the token endpoint
    # Retry-After: 0, so MSAL's own replay of a 5xx answer (5 s by default) does not apply
    stack.identity.fail_next(2, status=500, retry_after=0, path_contains="/oauth2/v2.0/token")
    assert app.access_token(force_refresh=True).token
    assert stack.identity.count("client_credentials") >= 2


def test_a_persistent_failure_ends_in_a_typed_error(stack, app_settings):
    app = clients.app_tokens(app_settings)
    app.access_token()
    stack.identity.fail_next(10, status=503, retry_after=0, path_contains="/oauth2/v2.0/token")
    with pytest.raises(TokenError) as info:
        app.access_token(force_refresh=True)
    assert info.value.transient
