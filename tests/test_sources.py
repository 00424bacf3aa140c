"""Sources: the ``.mail2blob/sources.json`` document (validation, defaults), the one source of the
``MAIL2BLOB_*`` settings, and filters as server-side IMAP SEARCH against Dovecot."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest

from mail2blob import clients
from mail2blob.blob_destination import STATE_PREFIX, blob_name
from mail2blob.errors import SettingsError
from mail2blob.fanout import drain_sources
from mail2blob.settings import PostAction, Settings
from mail2blob.sources import (
    SOURCES_BLOB,
    Filters,
    SourcesError,
    default_source,
    load_sources,
    parse_sources,
)
from tests.stack import constants as c

BASE = {
    "MAIL2BLOB_TENANT_ID": "contoso.onmicrosoft.com",
    "MAIL2BLOB_CLIENT_ID": "5e3ce6c0-2b1f-4285-8d4b-75ee78787346",
    "MAIL2BLOB_KEY_VAULT_URL": "https://kv-mail2blob.vault.azure.net/",
    "MAIL2BLOB_MAILBOX": "invoices@contoso.com",
    "MAIL2BLOB_STORAGE": "https://stmail.blob.core.windows.net",
    "MAIL2BLOB_FIC_CLIENT_ID": "9d7c6b5a-1111-4222-8333-944455556666",
}


def settings(**overrides: str) -> Settings:
    return Settings.from_env(BASE | {f"MAIL2BLOB_{k.upper()}": v for k, v in overrides.items()})


def parse(*sources: dict, base: Settings | None = None):
    return parse_sources(json.dumps({"sources": list(sources)}), base or settings())


# -- the document ----------------------------------------------------------------------------


def test_one_error_lists_every_problem_with_source_and_field():
    public_client = Settings.from_env({k: v for k, v in BASE.items() if "FIC" not in k})
    document = {
        "comment": "kept",  # comments are allowed
        "sources": [
            {"id": "Bad_Id", "mailbox": "a@b.example"},
            {"id": "nomail"},
            {
                "id": "many",
                "mailbox": "many@contoso.com",
                "folders": [],
                "auth": "password",
                "after": "archive",
                "filters": {"unseen": "yes", "since": "01.01.2026", "to": "x", "from": "a\nb"},
                "prefix": ".mail2blob/x",
                "token_secret": "not a secret name",
                "enabled": "true",
                "folder": "INBOX",
            },
            {
                "id": "mover",
                "mailbox": "m@contoso.com",
                "folders": ["INBOX", "Done"],
                "after": "move:Done",
            },
            {"id": "app", "mailbox": "app@contoso.com", "auth": "app"},
            {"id": "dup", "mailbox": "d1@contoso.com"},
            {"id": "dup", "mailbox": "d2@contoso.com"},
            "not an object",
        ],
    }
    with pytest.raises(SourcesError) as info:
        parse_sources(json.dumps(document), public_client)
    problems = info.value.problems
    expected = [
        "source 'Bad_Id': id: must be 1-63 lowercase letters",
        "source 'nomail': mailbox: required, an e-mail address",
        "source 'many': folders: must be a non-empty list",
        "source 'many': auth: must be one of delegated, app, got 'password'",
        "source 'many': after: 'archive' is not one of keep, seen, move:<folder>, delete",
        "source 'many': filters.unseen: must be true or false",
        "source 'many': filters.since: must be a date YYYY-MM-DD, got '01.01.2026'",
        "source 'many': filters.to: unknown filter",
        "source 'many': filters.from: must be non-empty text on one line",
        "source 'many': prefix: must not be inside .mail2blob/",
        "source 'many': token_secret: must be a Key Vault secret name",
        "source 'many': enabled: must be true or false, got 'true'",
        "source 'many': folder: unknown field",
        "source 'mover': after: moves into 'Done', which is also drained",
        "source 'app': auth: app (client credentials) needs MAIL2BLOB_CLIENT_SECRET or "
        "MAIL2BLOB_FIC_CLIENT_ID",
        "source 'dup': id: used by more than one source",
        "source #8: must be an object",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected), problems
    # One message naming the blob and every problem; a SettingsError (CLI exit status 2).
    assert isinstance(info.value, SettingsError)
    text = str(info.value)
    assert text.startswith(f"{SOURCES_BLOB} is not valid:")
    assert all(p in text for p in problems)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"[]", 'the document must be an object {"sources": [ ... ]}'),
        (b'{"sources": []}', "'sources' is empty"),
        (b'{"sources": [], "extra": 1}', "unknown top-level keys ['extra']"),
    ],
)
def test_document_shape_problems(data: bytes, problem: str):
    with pytest.raises(SourcesError) as info:
        parse_sources(data, settings())
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_defaults_of_a_source_in_the_document():
    (source,) = parse({"id": "invoices", "mailbox": " invoices@contoso.com "})
    assert source.mailbox == "invoices@contoso.com"
    assert source.folders == ("INBOX",) and source.auth == "delegated" and source.enabled
    assert source.after == PostAction("keep") and source.filters == Filters()
    assert source.token_secret == "mail2blob-token-invoices"
    assert source.blob_prefix == "invoices@contoso.com"  # like the one-source case
    assert source.state_key == "invoices"  # checkpoint and lease per source id


def test_full_source_and_what_the_engine_gets_from_it():
    (source,) = parse(
        {
            "id": "orders",
            "mailbox": "orders@contoso.com",
            "folders": ["INBOX", "Orders/2026"],
            "auth": "App",
            "after": "move:Archived",
            "filters": {"unseen": True, "since": "2026-01-01", "from": "shop", "subject": "Order"},
            "prefix": "/sales/orders/",
            "enabled": False,
        }
    )
    assert source.auth == "app" and not source.enabled
    assert source.blob_prefix == "sales/orders"
    assert source.filters.criteria() == (
        "UNSEEN",
        "SINCE",
        date(2026, 1, 1),
        "FROM",
        "shop",
        "SUBJECT",
        "Order",
    )
    narrowed = source.settings(settings())
    assert (narrowed.mailbox, narrowed.folders, narrowed.auth_mode) == (
        "orders@contoso.com",
        ("INBOX", "Orders/2026"),
        "app",
    )
    assert narrowed.after == PostAction("move", "Archived")
    assert narrowed.token_secret == "mail2blob-token-orders"
    # A prefix with "/" makes directories, each part escaped like a folder.
    when = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    name = blob_name(source.blob_prefix, "Orders/2026", when, "cd" * 32)
    assert name == f"sales/orders/Orders/2026/2026/02/03/20260203T040506Z-{'cd' * 16}.eml"


def test_the_settings_describe_the_one_default_source():
    base = settings(token_secret="kv-cache", folders="INBOX,Sent", after="seen", auth_mode="app")
    source = default_source(base)
    assert (source.id, source.mailbox, source.auth) == ("default", base.mailbox, "app")
    assert source.folders == ("INBOX", "Sent") and source.after == PostAction("seen")
    assert source.token_secret == "kv-cache"
    # Same blob names, checkpoint and lease as before sources existed: keyed by the mailbox.
    assert source.blob_prefix == source.state_key == base.mailbox
    assert source.settings(base) == base


def test_auth_mode_setting_is_validated():
    assert settings().auth_mode == "delegated"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(BASE | {"MAIL2BLOB_AUTH_MODE": "certificate"})
    assert info.value.problems == [
        "MAIL2BLOB_AUTH_MODE must be delegated or app, got 'certificate'"
    ]
    public = {k: v for k, v in BASE.items() if "FIC" not in k}
    with pytest.raises(SettingsError, match=r"AUTH_MODE app .* needs MAIL2BLOB_CLIENT_SECRET"):
        Settings.from_env(public | {"MAIL2BLOB_AUTH_MODE": "app"})


# -- against the stack -----------------------------------------------------------------------


def _message(subject: str, sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {c.MAILBOX}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n\r\nbody of {subject}\r\n"
    ).encode()


def upload_sources(env: dict[str, str], sources: list[dict]) -> None:
    container = clients.container_client(Settings.from_env(env))
    container.upload_blob(SOURCES_BLOB, json.dumps({"sources": sources}), overwrite=True)


def test_filters_are_server_side_search_criteria(stack, fresh):
    new, old = datetime(2026, 3, 1, 12, tzinfo=UTC), datetime(2025, 6, 1, 12, tzinfo=UTC)
    wanted = _message("Invoice 1 for March", "Billing <billing@fabrikam.example>")
    messages = [
        {"msg": wanted, "flags": (), "date": new},
        {
            "msg": _message("Invoice 2 read", "billing@fabrikam.example"),
            "flags": [b"\\Seen"],
            "date": new,
        },
        {"msg": _message("Invoice 3 old", "billing@fabrikam.example"), "flags": (), "date": old},
        {"msg": _message("Invoice 4 other", "spam@other.example"), "flags": (), "date": new},
        {"msg": _message("Newsletter", "billing@fabrikam.example"), "flags": (), "date": new},
    ]
    stack.dovecot.append_many(messages)
    filters = {"unseen": True, "since": "2026-01-01", "from": "fabrikam", "subject": "invoice"}
    upload_sources(
        fresh,
        [
            {
                "id": "billing",
                "mailbox": c.MAILBOX,
                "filters": filters,
                "prefix": "billing",
                "token_secret": "mail2blob-token-cache",
            },
            {
                "id": "japanese",
                "mailbox": c.MAILBOX,
                "filters": {"subject": "請求書"},
                "token_secret": "mail2blob-token-cache",
                "prefix": "ja",
            },
        ],
    )
    # RFC 2047 in the header; the filter is UTF-8 text (SEARCH CHARSET UTF-8).
    stack.dovecot.append(_message("=?utf-8?b?6KuL5rGC5pu4?= 7", "hanako@tokyo.example"))

    runs = drain_sources(Settings.from_env(fresh))

    assert [(r.source.id, r.outcome, r.result.stored) for r in runs] == [
        ("billing", "ok", 1),
        ("japanese", "ok", 1),
    ]
    container = clients.container_client(Settings.from_env(fresh))
    names = [b.name for b in container.list_blobs() if not b.name.startswith(STATE_PREFIX)]
    (billing,) = [n for n in names if n.startswith("billing/INBOX/2026/03/01/")]
    assert container.download_blob(billing).readall() == wanted
    assert [n for n in names if n.startswith("ja/INBOX/")]
    # Per-source checkpoints; the mailbox is untouched (keep).
    state = {b.name for b in container.list_blobs(name_starts_with=f"{STATE_PREFIX}state/")}
    assert state == {f"{STATE_PREFIX}state/billing.json", f"{STATE_PREFIX}state/japanese.json"}
    assert len(stack.dovecot.fetch_all()) == 6


def test_without_the_blob_the_settings_are_the_one_source(stack, fresh):
    from tests.mailgen import make_messages

    stack.dovecot.append_many(make_messages(3, seed=21))
    sources = load_sources(Settings.from_env(fresh))
    assert sources.origin == "settings" and [s.id for s in sources.enabled] == ["default"]
    (run,) = drain_sources(Settings.from_env(fresh))
    assert run.outcome == "ok" and run.result.stored == 3
    container = clients.container_client(Settings.from_env(fresh))
    names = {b.name for b in container.list_blobs()}
    # The names of the one-mailbox era: mail under the mailbox, state keyed by the mailbox.
    assert f"{STATE_PREFIX}state/{c.MAILBOX}.json" in names
    assert f"{STATE_PREFIX}locks/{c.MAILBOX}.lock" in names
    assert len([n for n in names if n.startswith(f"{c.MAILBOX}/INBOX/")]) == 3


def test_an_invalid_blob_stops_the_tick_and_names_every_problem(stack, fresh):
    upload_sources(fresh, [{"id": "x", "mailbox": "nope"}, {"mailbox": c.MAILBOX}])
    with pytest.raises(SourcesError) as info:
        load_sources(Settings.from_env(fresh))
    assert info.value.problems == [
        "source 'x': mailbox: required, an e-mail address, got 'nope'",
        "source #2: id: required (lowercase letters, digits and dashes)",
    ]
