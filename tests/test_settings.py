from pathlib import Path

import pytest

from mail2blob.errors import SettingsError
from mail2blob.settings import SETTING_NAMES, PostAction, Settings

BASE = {
    "MAIL2BLOB_TENANT_ID": "contoso.onmicrosoft.com",
    "MAIL2BLOB_CLIENT_ID": "5e3ce6c0-2b1f-4285-8d4b-75ee78787346",
    "MAIL2BLOB_KEY_VAULT_URL": "https://kv-mail2blob.vault.azure.net/",
    "MAIL2BLOB_MAILBOX": "invoices@contoso.com",
    "MAIL2BLOB_STORAGE": "https://stmail.blob.core.windows.net",
}


def test_defaults_follow_exchange_online():
    s = Settings.from_env(BASE)
    assert s.imap_host == "outlook.office365.com"
    assert s.imap_port == 993
    assert s.folders == ("INBOX",)
    assert s.after == PostAction("keep")
    assert s.authority == "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    assert s.key_vault_url == "https://kv-mail2blob.vault.azure.net"
    assert s.container == "mail"
    assert not s.storage_is_connection_string


def test_one_error_names_every_missing_and_invalid_setting():
    env = {
        "MAIL2BLOB_MAILBOX": "not-an-address",
        "MAIL2BLOB_IMAP_PORT": "99999",
        "MAIL2BLOB_AFTER": "archive",
        "MAIL2BLOB_CONTAINER": "Bad_Name",
        "MAIL2BLOB_SCHEDULE": "*/5 * * * *",
        "MAIL2BLOB_CA_BUNDLE": "/nonexistent/ca.pem",
        "MAIL2BLOB_TIME_BUDGET": "-1",
    }
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    text = str(info.value)
    for name in (
        "TENANT_ID",
        "CLIENT_ID",
        "KEY_VAULT_URL",
        "STORAGE",
        "MAILBOX",
        "IMAP_PORT",
        "AFTER",
        "CONTAINER",
        "SCHEDULE",
        "CA_BUNDLE",
        "TIME_BUDGET",
    ):
        assert f"MAIL2BLOB_{name}" in text
    assert len(info.value.problems) == 11


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keep", PostAction("keep")),
        ("SEEN", PostAction("seen")),
        ("delete", PostAction("delete")),
        ("move:Archive/2026", PostAction("move", "Archive/2026")),
    ],
)
def test_post_action_parses(text, expected):
    assert PostAction.parse(text) == expected
    assert PostAction.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["move:", "archive", "", "move"])
def test_post_action_rejects(text):
    with pytest.raises(ValueError):
        PostAction.parse(text)


def test_moving_into_a_drained_folder_is_refused():
    with pytest.raises(SettingsError, match="also drained"):
        Settings.from_env(
            BASE | {"MAIL2BLOB_FOLDERS": "INBOX, Done", "MAIL2BLOB_AFTER": "move:Done"}
        )


def test_connection_string_and_secret_not_in_repr(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = Settings.from_env(
        BASE
        | {
            "MAIL2BLOB_STORAGE": "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=abc",
            "MAIL2BLOB_CLIENT_SECRET": "s3cr3t-value",
            "MAIL2BLOB_CA_BUNDLE": str(ca),
        }
    )
    assert s.storage_is_connection_string
    assert "s3cr3t-value" not in repr(s)


def test_setting_names_cover_every_field_read():
    source = Path("mail2blob/settings.py").read_text()
    import re

    read = {"MAIL2BLOB_" + n for n in re.findall(r'(?:get|required)\("([A-Z_]+)"', source)}
    assert read == set(SETTING_NAMES)


def test_azure_reason_keeps_codes_and_drops_url_queries():
    from azure.core.exceptions import HttpResponseError, ServiceRequestError

    from mail2blob.errors import azure_reason

    refused = ServiceRequestError(
        "HTTPSConnectionPool(host='st.blob.core.windows.net', port=443): Max retries exceeded "
        "with url: /mail/a.eml?sv=2024-01-01&sig=c2VjcmV0c2lnbmF0dXJl (Connection refused)"
    )
    text = azure_reason(refused)
    assert "sig=" not in text and "c2VjcmV0" not in text
    assert text.startswith("ServiceRequestError:") and "Connection refused" in text

    rejected = HttpResponseError("body that must not be quoted")
    rejected.status_code, rejected.error_code = 400, "InvalidMetadata"
    assert azure_reason(rejected) == "InvalidMetadata (HTTP 400)"
