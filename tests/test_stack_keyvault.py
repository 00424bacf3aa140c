"""The Key Vault stand-in, driven through the real ``azure.keyvault.secrets.SecretClient``."""

from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets._shared import http_challenge_cache

from tests.stack import constants
from tests.stack.certs import TestCA
from tests.stack.keyvault import MAX_VALUE_CHARS, KeyVaultStandIn
from tests.stack.signing import SigningKey

VAULT_SCOPE = "https://vault.azure.net/.default"


class FakeCredential:
    """A ``TokenCredential`` that signs Key Vault access tokens itself and records each request."""

    def __init__(
        self,
        signing_key: SigningKey,
        audience: str = constants.VAULT_RESOURCE,
        lifetime: int = 3600,
        token: str | None = None,
    ) -> None:
        self.signing_key = signing_key
        self.audience = audience
        self.lifetime = lifetime
        self.token = token  # a fixed (e.g. junk) token instead of a signed one
        self.calls: list[dict[str, Any]] = []

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.calls.append(
            {"scopes": scopes, "tenant_id": tenant_id, "enable_cae": enable_cae, "claims": claims}
        )
        now = int(time.time())
        expires_on = now + self.lifetime
        if self.token is not None:
            return AccessToken(self.token, expires_on)
        token = self.signing_key.sign(
            {
                "aud": self.audience,
                "iss": f"https://sts.windows.net/{constants.TENANT_ID}/",
                "iat": now,
                "nbf": min(now, expires_on),
                "exp": expires_on,
                "tid": constants.TENANT_ID,
                "oid": constants.MI_PRINCIPAL_ID,
                "sub": constants.MI_PRINCIPAL_ID,
                "appid": constants.MI_CLIENT_ID,
            }
        )
        return AccessToken(token, expires_on)


ClientFactory = Callable[..., SecretClient]


@pytest.fixture
def vault(keyvault: KeyVaultStandIn) -> KeyVaultStandIn:
    keyvault.reset()
    return keyvault


@pytest.fixture
def fresh_vault(test_ca: TestCA, signing_key: SigningKey) -> Iterator[KeyVaultStandIn]:
    """A vault no client has talked to yet (the SDK caches challenges per vault URL)."""
    with KeyVaultStandIn(test_ca, signing_key) as standin:
        http_challenge_cache.remove_challenge_for_url(standin.url)  # in case the port was reused
        yield standin


@pytest.fixture
def make_client(signing_key: SigningKey) -> ClientFactory:
    def make(standin: KeyVaultStandIn, credential: Any = None, **kwargs: Any) -> SecretClient:
        options: dict[str, Any] = {
            "verify_challenge_resource": False,
            "connection_verify": str(standin.ca_cert_path),
            "retry_total": 2,
            "retry_backoff_factor": 0.01,
        }
        options.update(kwargs)
        return SecretClient(
            vault_url=standin.url, credential=credential or FakeCredential(signing_key), **options
        )

    return make


def _statuses(standin: KeyVaultStandIn, method: str, path: str) -> list[int | None]:
    return [r.status for r in standin.log if r.method == method and r.path == path]


def test_challenge_is_sent_first_then_the_token(
    fresh_vault: KeyVaultStandIn, make_client: ClientFactory, signing_key: SigningKey
) -> None:
    credential = FakeCredential(signing_key)
    client = make_client(fresh_vault, credential)

    client.set_secret("first", "v1")
    client.get_secret("first")

    first, second, third = fresh_vault.log
    assert (first.method, first.path, first.authorized, first.status) == (
        "PUT",
        "/secrets/first",
        False,
        401,
    )
    assert (second.method, second.authorized, second.status) == ("PUT", True, 200)
    assert (third.method, third.path, third.authorized, third.status) == (
        "GET",
        "/secrets/first/",
        True,
        200,
    )  # challenge cached: no second 401
    assert credential.calls == [
        {
            "scopes": (VAULT_SCOPE,),
            "tenant_id": constants.TENANT_ID,
            "enable_cae": True,
            "claims": None,
        }
    ]


def test_unauthenticated_request_gets_the_exact_challenge(fresh_vault: KeyVaultStandIn) -> None:
    context = ssl.create_default_context(cafile=str(fresh_vault.ca_cert_path))
    request = urllib.request.Request(f"{fresh_vault.url}/secrets/x?api-version=7.6")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, context=context, timeout=5)
    assert caught.value.code == 401
    assert caught.value.headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{constants.TENANT_ID}", '
        'resource="https://vault.azure.net"'
    )
    assert json.loads(caught.value.read())["error"]["code"] == "Unauthorized"


def test_client_without_verify_challenge_resource_false_rejects_loopback(
    fresh_vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    client = make_client(fresh_vault, verify_challenge_resource=True)
    with pytest.raises(ValueError, match="does not match the requested domain"):
        client.set_secret("x", "v")
    assert fresh_vault.value("x") is None


def test_client_must_be_told_the_test_ca(
    vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    # REQUESTS_CA_BUNDLE points at the system bundle on this machine: no implicit trust.
    client = make_client(vault, connection_verify=True)
    with pytest.raises(ServiceRequestError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get_secret("x")
    assert vault.requests == []


def test_set_get_and_list_versions(vault: KeyVaultStandIn, make_client: ClientFactory) -> None:
    client = make_client(vault)
    first = client.set_secret("token-cache", '{"v": 1}', content_type="application/json")
    second = client.set_secret("token-cache", '{"v": 2}', tags={"mailbox": "archive"})

    assert len(first.properties.version) == 32
    assert first.properties.version != second.properties.version
    assert first.id == f"{vault.url}/secrets/token-cache/{first.properties.version}"
    assert first.properties.content_type == "application/json"
    assert first.properties.enabled is True
    assert first.properties.recovery_level == "Recoverable+Purgeable"
    assert first.properties.created_on is not None
    assert second.properties.tags == {"mailbox": "archive"}

    latest = client.get_secret("token-cache")
    assert (latest.value, latest.properties.version) == ('{"v": 2}', second.properties.version)
    assert client.get_secret("token-cache", first.properties.version).value == '{"v": 1}'
    assert ("GET", "/secrets/token-cache/") in vault.requests

    listed = [p.version for p in client.list_properties_of_secret_versions("token-cache")]
    assert listed == [first.properties.version, second.properties.version]
    assert vault.versions("token-cache") == listed
    assert vault.value("token-cache") == '{"v": 2}'
    assert vault.value("token-cache", first.properties.version) == '{"v": 1}'
    assert vault.value("TOKEN-CACHE") == '{"v": 2}'  # names are case-insensitive

    names = [p.name for p in client.list_properties_of_secrets()]
    assert names == ["token-cache"]


def test_lists_are_paged_with_next_link(vault: KeyVaultStandIn, make_client: ClientFactory) -> None:
    for i in range(30):
        vault.seed(f"s{i:02d}", "x")
    client = make_client(vault)
    names = [p.name for p in client.list_properties_of_secrets()]
    assert names == [f"s{i:02d}" for i in range(30)]
    assert _statuses(vault, "GET", "/secrets") == [200, 200]  # 25 + 5


def test_unknown_secret_or_version_is_404(
    vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    client = make_client(vault)
    with pytest.raises(ResourceNotFoundError) as caught:
        client.get_secret("missing")
    assert caught.value.status_code == 404
    assert caught.value.error.code == "SecretNotFound"
    assert "A secret with (name/id) missing was not found" in caught.value.message

    client.set_secret("present", "v")
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("present", "0" * 32)


def test_delete_is_soft_then_get_is_404(vault: KeyVaultStandIn, make_client: ClientFactory) -> None:
    client = make_client(vault)
    client.set_secret("doomed", "v")

    deleted = client.begin_delete_secret("doomed").result()
    assert deleted.recovery_id == f"{vault.url}/deletedsecrets/doomed"
    assert deleted.scheduled_purge_date is not None
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("doomed")
    assert vault.value("doomed") is None
    with pytest.raises(ResourceExistsError):  # deleted but recoverable: the name is taken
        client.set_secret("doomed", "again")

    client.purge_deleted_secret("doomed")
    client.set_secret("doomed", "again")
    assert vault.value("doomed") == "again"


def test_throttling_with_retry_after_is_retried(
    vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    client = make_client(vault)
    client.set_secret("warm", "up")  # challenge out of the way
    vault.fail_next(1, status=429, path_contains="/secrets/hot")  # Retry-After: 1

    started = time.monotonic()
    client.set_secret("hot", "value")
    elapsed = time.monotonic() - started

    assert _statuses(vault, "PUT", "/secrets/hot") == [429, 200]
    assert elapsed >= 1.0  # the SDK waited for Retry-After, not its tiny backoff
    assert vault.value("hot") == "value"


@pytest.mark.parametrize(
    ("status", "code"), [(500, "InternalServerError"), (503, "ServiceUnavailable")]
)
def test_persistent_server_errors_surface_after_retries(
    vault: KeyVaultStandIn, make_client: ClientFactory, status: int, code: str
) -> None:
    client = make_client(vault)
    vault.seed("flaky", "v")
    vault.fail_next(10, status=status, retry_after=None, method="GET")
    with pytest.raises(HttpResponseError) as caught:
        client.get_secret("flaky")
    assert caught.value.status_code == status
    assert caught.value.error.code == code
    # A challenge (401) may come first; then 1 try + retry_total=2 retries, and no more.
    assert [s for s in _statuses(vault, "GET", "/secrets/flaky/") if s != 401] == [status] * 3


def test_concurrent_writers_each_get_a_version(
    vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    client = make_client(vault)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: client.set_secret("shared", f"v{i}"), range(40)))
    versions = vault.versions("shared")
    assert sorted(versions) == sorted(r.properties.version for r in results)
    assert len(set(versions)) == 40


def test_oversize_value_is_bad_parameter(
    vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    client = make_client(vault)
    client.set_secret("big", "x" * MAX_VALUE_CHARS)  # exactly at the limit is fine
    with pytest.raises(HttpResponseError) as caught:
        client.set_secret("big", "x" * (MAX_VALUE_CHARS + 1))
    assert caught.value.status_code == 400
    assert caught.value.error.code == "BadParameter"
    assert "exceeds the maximum allowed size" in caught.value.message
    assert len(vault.versions("big")) == 1


def test_invalid_name_is_bad_parameter(vault: KeyVaultStandIn, make_client: ClientFactory) -> None:
    with pytest.raises(HttpResponseError) as caught:
        make_client(vault).set_secret("not_allowed", "v")
    assert caught.value.status_code == 400
    assert caught.value.error.code == "BadParameter"


@pytest.mark.parametrize("problem", ["wrong-audience", "other-key", "expired"])
def test_bad_token_is_client_authentication_error(
    vault: KeyVaultStandIn, make_client: ClientFactory, signing_key: SigningKey, problem: str
) -> None:
    credential = {
        "wrong-audience": lambda: FakeCredential(signing_key, audience="https://storage.azure.com"),
        "other-key": lambda: FakeCredential(SigningKey()),
        "expired": lambda: FakeCredential(signing_key, lifetime=-60),
    }[problem]()
    with pytest.raises(ClientAuthenticationError):
        make_client(vault, credential).set_secret("guarded", "v")
    assert credential.calls  # a token was offered, and refused
    assert {r.status for r in vault.log} == {401}
    assert vault.value("guarded") is None


def test_any_token_is_accepted_when_not_required(
    vault: KeyVaultStandIn, make_client: ClientFactory, signing_key: SigningKey
) -> None:
    vault.require_valid_token(False)
    client = make_client(vault, FakeCredential(signing_key, token="not-a-jwt"))
    client.set_secret("open", "v")
    assert vault.value("open") == "v"


def test_delayed_reply_times_out_and_the_retry_succeeds(
    vault: KeyVaultStandIn, make_client: ClientFactory
) -> None:
    client = make_client(vault, read_timeout=1.5)
    client.set_secret("slow", "v0")  # challenge out of the way
    vault.delay_next(1, 3.0, method="PUT")

    client.set_secret("slow", "v1")
    assert len(vault.versions("slow")) == 2  # the retry landed

    deadline = time.monotonic() + 10
    while len(vault.versions("slow")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(vault.versions("slow")) == 3  # and so, later, did the abandoned request


def test_down_vault_fails_and_recovers(vault: KeyVaultStandIn, make_client: ClientFactory) -> None:
    client = make_client(vault)
    client.set_secret("up", "v")  # leaves a kept-alive connection open
    vault.set_down(True)
    with pytest.raises((ServiceRequestError, ServiceResponseError)):
        client.get_secret("up")
    vault.set_down(False)
    assert client.get_secret("up").value == "v"


def test_values_and_tokens_stay_out_of_the_log(
    vault: KeyVaultStandIn,
    make_client: ClientFactory,
    signing_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.stack.keyvault")
    credential = FakeCredential(signing_key)
    client = make_client(vault, credential)
    client.set_secret("private", "s3cr3t-value")
    client.get_secret("private")
    token = credential.get_token(VAULT_SCOPE).token
    assert "/secrets/private" in caplog.text  # it does log requests...
    assert "s3cr3t-value" not in caplog.text  # ...but never values
    assert token.split(".")[0] not in caplog.text  # or tokens (same header for every token)
