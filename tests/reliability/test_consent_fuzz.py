"""Property-based tests of the consent endpoints (hypothesis): whatever arrives at the callback
(query or form parameters, body, content type, cookie, a real flow with a forged or the real
``state``) and at the start link (parameters, Host headers), the answer is a page, never a 500
or an exception, and no token is ever stored without a valid flow: the vault stays empty until a
real sign-in finishes.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import azure.functions as func
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.stack import constants as c
from tests.test_consent import (
    CALLBACK,
    HOST,
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

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = st.sampled_from(
    ["code", "state", "error", "error_description", "client_info", "session_state", "id_token"]
) | st.text(max_size=12)
VALUES = st.text(max_size=120) | st.sampled_from(
    [
        "",
        "access_denied",
        "AADSTS65004: <script>alert(1)</script>",
        "x" * 5000,
        "\x00\r\n\u202e",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        "%00%0d%0a",
    ]
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-16",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
    ]
)
#: The cookie: a flow started for the example (drawn most often), none, or junk.
COOKIE_KINDS = st.sampled_from(["real", "real", "real", "real", "none", "junk"])
JUNK_COOKIES = st.text(max_size=80) | st.sampled_from(
    ["mail2blob_consent=", 'mail2blob_consent="unterminated', ";;;=;", "mail2blob_consent=x" * 50]
)
#: The parameters Microsoft sends, each present or not, plus anything else.
PARAMS = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {},
        optional={
            k: VALUES for k in ("code", "state", "error", "error_description", "client_info")
        },
    ),
    st.dictionaries(KEYS, VALUES, max_size=3),
)


def _vault_versions(stack) -> int:
    return len(stack.keyvault.versions(SECRET_NAME))


def _checked(response: func.HttpResponse) -> str:
    assert response.status_code < 500, page(response)
    assert response.headers.get("Cache-Control") == "no-store"
    return page(response) if response.get_body() else ""


@FUZZ
@given(
    params=PARAMS,
    cookie_kind=COOKIE_KINDS,
    junk_cookie=JUNK_COOKIES,
    real_state=st.booleans(),
    method=st.sampled_from(["GET", "POST"]),
    content_type=CONTENT_TYPES,
    raw_body=st.none() | st.binary(max_size=300),
)
def test_callback_never_fails_and_never_stores_without_a_valid_flow(
    stack,
    app_functions,  # noqa: F811 - the fixture imported above
    monkeypatch,
    params,
    cookie_kind,
    junk_cookie,
    real_state,
    method,
    content_type,
    raw_body,
):
    consent_env(stack, monkeypatch)  # every example: stand-ins reset, empty vault
    headers = {"host": HOST}
    if cookie_kind == "real":
        flow_id, authorize = begin(app_functions)
        if real_state or "state" not in params:
            params = dict(params, state=parse_qs(urlsplit(authorize).query)["state"][0])
        headers["cookie"] = f"mail2blob_consent={flow_id}"
    elif cookie_kind == "junk":
        headers["cookie"] = junk_cookie
    if method == "POST":
        headers["content-type"] = content_type
        body = raw_body if raw_body is not None else urlencode(params).encode()
        req = func.HttpRequest("POST", CALLBACK, headers=headers, params={}, body=body)
    else:
        url = f"{CALLBACK}?{urlencode(params)}"
        req = func.HttpRequest("GET", url, headers=headers, params=params, body=b"")
    response = app_functions["consent_callback"].get_user_function()(req)
    text = _checked(response)
    assert 'data-outcome="saved"' not in text
    assert _vault_versions(stack) == 0


@settings(FUZZ, max_examples=50)
@given(
    params=st.dictionaries(
        st.sampled_from(["login_hint", "source", "mailbox", "code", "prompt"]), VALUES, max_size=4
    ),
    host=st.text(max_size=60) | st.sampled_from(["mail2blob.example", "[::1]:443", "a" * 300]),
    forwarded=st.none() | st.text(max_size=60),
)
def test_start_never_fails_on_odd_parameters_or_hosts(
    stack,
    app_functions,  # noqa: F811 - the fixture imported above
    monkeypatch,
    params,
    host,
    forwarded,
):
    consent_env(stack, monkeypatch)
    headers = {"host": host}
    if forwarded is not None:
        headers["x-forwarded-host"] = forwarded
    query = {"code": "the-function-key", **params}
    req = func.HttpRequest(
        "GET",
        f"https://{HOST}/api/consent?{urlencode(query)}",
        headers=headers,
        params=query,
        body=b"",
    )
    response = app_functions["consent_start"].get_user_function()(req)
    assert response.status_code in (302, 400), page(response)
    assert _vault_versions(stack) == 0


def test_the_property_can_fail_a_real_sign_in_stores_a_token(
    stack,
    app_functions,  # noqa: F811 - the fixture imported above
    monkeypatch,
):
    consent_env(stack, monkeypatch)
    flow_id, authorize = begin(app_functions)
    response = callback(app_functions, sign_in(stack, authorize, c.MAILBOX), flow_id)
    assert 'data-outcome="saved"' in _checked(response)
    assert _vault_versions(stack) == 1
