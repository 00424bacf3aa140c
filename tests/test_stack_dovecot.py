"""The Dovecot stand-in behaves like Exchange Online where mail2blob depends on it: OAuth2
logins accepted and refused for the right reasons, fast; seeded mail comes back as stored."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.stack import constants
from tests.stack.dovecot import Dovecot, make_access_token
from tests.stack.signing import SigningKey

MAILBOX = constants.MAILBOX

V2_ISSUER = f"https://login.microsoftonline.com/{constants.TENANT_ID}/v2.0"
# Generous ceilings: a good login takes ~25 ms here, a refusal ~0.5 s (Dovecot flushes auth
# failures on a 500 ms timer even with auth_failure_delay = 0).
LOGIN_CEILING = 1.0
REFUSAL_CEILING = 2.0


@pytest.fixture
def clean(dovecot: Dovecot) -> Dovecot:
    dovecot.delete_all()
    return dovecot


def _login_seconds(login: Callable[[], IMAPClient]) -> float:
    started = time.monotonic()
    client = login()
    elapsed = time.monotonic() - started
    client.logout()
    return elapsed


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({}, id="v1-outlook-token"),
        pytest.param({"issuer": V2_ISSUER, "appid": None}, id="v2-issuer-azp-only"),
        pytest.param({"azp": constants.PUBLIC_CLIENT_ID, "appid": None}, id="public-client"),
    ],
)
def test_xoauth2_accepts_valid_token(
    dovecot: Dovecot, signing_key: SigningKey, claims: dict[str, str | None]
) -> None:
    token = make_access_token(signing_key, **claims)
    client = dovecot.xoauth2_client(token)
    try:
        assert client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"] > 0
    finally:
        client.logout()
    assert _login_seconds(lambda: dovecot.xoauth2_client(token)) < LOGIN_CEILING


def test_oauthbearer_accepts_valid_token(dovecot: Dovecot, signing_key: SigningKey) -> None:
    token = make_access_token(signing_key)
    assert _login_seconds(lambda: dovecot.oauthbearer_client(token)) < LOGIN_CEILING


def test_token_for_other_user_works_for_that_user(
    dovecot: Dovecot, signing_key: SigningKey
) -> None:
    token = make_access_token(signing_key, user=constants.OTHER_USER)
    client = dovecot.xoauth2_client(token, user=constants.OTHER_USER)
    client.logout()


def test_delegate_token_opens_shared_mailbox(clean: Dovecot, signing_key: SigningKey) -> None:
    clean.delete_all(constants.SHARED_MAILBOX)
    clean.append(b"Subject: for the team\r\n\r\nx\r\n", user=constants.SHARED_MAILBOX)
    token = make_access_token(signing_key, user=constants.MAILBOX)

    client = clean.xoauth2_client(token, user=constants.SHARED_MAILBOX)
    try:
        client.select_folder("INBOX", readonly=True)
        assert len(client.search()) == 1
    finally:
        client.logout()
        clean.delete_all(constants.SHARED_MAILBOX)


def _refusals(key: SigningKey) -> dict[str, tuple[str, str, str]]:
    """case -> (token, user=, the reason Dovecot logs for refusing it)."""
    now = int(time.time())
    other_key = SigningKey()
    return {
        "expired": (make_access_token(key, lifetime=-60), MAILBOX, "Token has expired"),
        "not-yet-valid": (
            make_access_token(key, nbf=now + 600, iat=now + 600),
            MAILBOX,
            "Token is not valid yet",
        ),
        "wrong-signature": (make_access_token(other_key, kid=key.kid), MAILBOX, "Bad signature"),
        "unknown-kid": (
            make_access_token(key, kid="no-such-kid"),
            MAILBOX,
            "key 'no-such-kid' not found",
        ),
        "unknown-azp": (
            make_access_token(key, azp="00000000-0000-0000-0000-000000000000"),
            MAILBOX,
            f"key '{key.kid}' not found",
        ),
        "wrong-audience": (
            make_access_token(key, audience="https://graph.microsoft.com"),
            MAILBOX,
            "Token audience does not include",
        ),
        "wrong-issuer": (
            make_access_token(key, issuer="https://sts.windows.net/someone-else/"),
            MAILBOX,
            "Issuer 'https://sts.windows.net/someone-else/' is not allowed",
        ),
        "other-user": (
            make_access_token(key, user=constants.OTHER_USER),
            MAILBOX,
            f"Username '{MAILBOX}' did not match '{constants.OTHER_USER}'",
        ),
        "shared-mailbox-non-delegate": (
            make_access_token(key, user=constants.OTHER_USER),
            constants.SHARED_MAILBOX,
            f"Username '{constants.SHARED_MAILBOX}' did not match '{constants.OTHER_USER}'",
        ),
    }


def test_refuses_bad_tokens_for_the_right_reason(dovecot: Dovecot, signing_key: SigningKey) -> None:
    cases = _refusals(signing_key)
    log_start = len(dovecot.log_text())

    def attempt(token: str, user: str) -> tuple[str, float]:
        started = time.monotonic()
        try:
            dovecot.xoauth2_client(token, user=user).logout()
        except LoginError as exc:
            return str(exc), time.monotonic() - started
        return "accepted", time.monotonic() - started

    # Each refusal costs ~0.5 s on the server side; run them side by side.
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {
            case: pool.submit(attempt, token, user) for case, (token, user, _) in cases.items()
        }
        results = {case: future.result() for case, future in futures.items()}

    for case, (outcome, seconds) in results.items():
        assert "AUTHENTICATIONFAILED" in outcome, case
        assert seconds < REFUSAL_CEILING, (case, seconds)
    log = dovecot.log_text()[log_start:]
    for case, (token, _user, reason) in cases.items():
        assert reason in log, case
        assert token not in log and token.split(".")[2] not in log, case


def test_master_user_is_refused_with_wrong_password(dovecot: Dovecot) -> None:
    client = dovecot.connect()
    try:
        with pytest.raises(LoginError):
            client.login(f"{constants.MAILBOX}*{constants.SEED_MASTER_USER}", "wrong")
    finally:
        client.shutdown()


def test_seed_and_fetch_round_trip_is_byte_exact(clean: Dovecot) -> None:
    when = dt.datetime(2021, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    eight_bit = (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@contoso.example>\r\n"
        b"Subject: 8-bit body\r\nContent-Type: text/plain; charset=latin-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe \xe9\xff\r\n.\r\nend\r\n"
    )
    binary = (
        b"Subject: random\r\n\r\n"
        + os.urandom(3000).replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
        + b"\r\n"
    )
    clean.append(eight_bit, flags=[b"\\Seen", b"$Archived"], internaldate=when)
    clean.append(binary)

    fetched = list(clean.fetch_all().values())

    assert [m[b"BODY[]"] for m in fetched] == [eight_bit, binary]
    assert set(fetched[0][b"FLAGS"]) == {b"\\Seen", b"$Archived"}
    assert fetched[0][b"INTERNALDATE"] == when
    assert fetched[1][b"FLAGS"] == ()
    # fetch_all peeks: nothing became \Seen.
    assert [m[b"FLAGS"] for m in clean.fetch_all().values()][1] == ()


def test_bare_lf_and_nul_are_normalised_by_dovecot(clean: Dovecot) -> None:
    """Dovecot stores LF and serves CRLF, so bare LF comes back as CRLF; NUL becomes 0x80.
    Exchange also serves CRLF; code must not expect bare-LF bytes back."""
    clean.append(b"Subject: lf\nFrom: a@contoso.example\n\nline \xe9\nmixed\r\nend\n")
    clean.append(b"Subject: nul\r\n\r\na\x00b\r\n")

    bodies = [m[b"BODY[]"] for m in clean.fetch_all().values()]

    assert bodies == [
        b"Subject: lf\r\nFrom: a@contoso.example\r\n\r\nline \xe9\r\nmixed\r\nend\r\n",
        b"Subject: nul\r\n\r\na\x80b\r\n",
    ]


def test_append_many_folders_and_delete_all(clean: Dovecot) -> None:
    messages = [b"Subject: bulk %d\r\n\r\n" % i + b"x" * 2000 + b"\r\n" for i in range(1200)]
    clean.create_folder("Archive")
    clean.create_folder("Archive/2024.Q1")

    started = time.monotonic()
    clean.append_many(messages, folder="Archive/2024.Q1")
    rate = len(messages) / (time.monotonic() - started)

    assert rate > 500, f"append_many: {rate:.0f} msg/s"
    uids = clean.folder_uids("Archive/2024.Q1")
    assert uids == list(range(1, 1201))
    assert clean.fetch_all("Archive/2024.Q1")[1200][b"BODY[]"] == messages[-1]
    assert set(clean.folders()) == {"INBOX", "Archive", "Archive/2024.Q1"}

    clean.append(b"Subject: in inbox\r\n\r\nx\r\n")
    clean.delete_all()

    assert clean.folders() == ["INBOX"]
    assert clean.folder_uids() == []


def test_users_are_separate_mailboxes(clean: Dovecot) -> None:
    clean.delete_all(constants.SHARED_MAILBOX)
    clean.append(b"Subject: shared\r\n\r\nx\r\n", user=constants.SHARED_MAILBOX)

    assert len(clean.folder_uids(user=constants.SHARED_MAILBOX)) == 1
    assert clean.folder_uids() == []
    clean.delete_all(constants.SHARED_MAILBOX)


def test_restart_keeps_mail_and_port(clean: Dovecot, signing_key: SigningKey) -> None:
    clean.append(b"Subject: survives\r\n\r\nx\r\n")
    before = (clean.port, clean.uidvalidity(), clean.fetch_all())

    clean.restart()

    assert (clean.port, clean.uidvalidity(), clean.fetch_all()) == before
    clean.xoauth2_client(make_access_token(signing_key)).logout()


@pytest.mark.parametrize("folder", ["INBOX", "Archive/2023"])
def test_recreate_folder_with_new_uidvalidity(clean: Dovecot, folder: str) -> None:
    if folder != "INBOX":
        clean.create_folder(folder)
    when = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    clean.append(b"Subject: one\r\n\r\n1\r\n", folder=folder, flags=[b"\\Flagged"])
    clean.append(b"Subject: two\r\n\r\n2\r\n", folder=folder, internaldate=when)
    old_validity = clean.uidvalidity(folder)
    old = clean.fetch_all(folder)

    new_validity = clean.recreate_folder_with_new_uidvalidity(folder)

    assert new_validity == clean.uidvalidity(folder) != old_validity
    new = clean.fetch_all(folder)
    assert list(new.values()) == list(old.values())
