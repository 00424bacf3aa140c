from datetime import UTC, datetime

from mail2blob.blob_destination import ascii_safe, blob_name, message_metadata


def test_blob_name_is_browsable_and_content_addressed():
    when = datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC)
    name = blob_name("invoices@contoso.com", "INBOX/Invoices 2026", when, "ab" * 32)
    assert name == (
        "invoices@contoso.com/INBOX/Invoices 2026/2026/11/26/20261126T150405Z-" + "ab" * 16 + ".eml"
    )


def test_blob_name_escapes_what_blob_names_cannot_hold():
    when = datetime(2026, 1, 2, tzinfo=UTC)
    name = blob_name("a@b.c", "../x\\y%z\x01", when, "0" * 64)
    assert "\\" not in name and "\x01" not in name
    assert "/../" not in name
    assert name.startswith("a@b.c/%2E%2E/x%5Cy%25z%01/2026/01/02/")


def test_ascii_safe_keeps_everything_but_length():
    text = "Rechnung Nr. 42 – Müller 100% \r\n"
    safe = ascii_safe(text)
    assert safe.isascii()
    assert all(" " <= c <= "~" for c in safe)
    from urllib.parse import unquote

    assert unquote(safe) == text.strip()


def test_metadata_decodes_rfc2047_and_survives_garbage():
    msg = (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\n"
        b"Subject: =?iso-8859-1?q?Gr=FC=DFe?= and more\r\n"
        b"Message-ID: <1@x>\r\n\r\nbody"
    )
    meta = message_metadata(msg)
    assert meta["from_addr"] == "J%C3%BCrgen <j@example.com>"
    assert meta["subject"].startswith("Gr%C3%BC%C3%9Fe")
    assert meta["message_id"] == "<1@x>"
    broken = message_metadata(b"\x00\xff\xfe: =?bad?x?zz?=\n\nbody")
    assert all(v.isascii() for v in broken.values())
    assert message_metadata(b"") == {"message_id": "", "from_addr": "", "subject": "", "date": ""}
