"""Hostile and odd input: every message of ``corpus.py`` stored byte for byte as Dovecot serves
it, its metadata sanitised (printable ASCII, no CR/LF, bounded), and a message whose upload
fails recorded as failed with its reason, left alone in the mailbox, and stored by the next run
without holding up the others. Plus a zero-length message (served through the proxy: Dovecot
will not store one) and a 50 MB message.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from tests.reliability import report
from tests.reliability.corpus import hostile_messages, huge_message
from tests.reliability.harness import (
    Served,
    container_of,
    final_mailbox_problems,
    load_checkpoint,
    sha,
    stored_prefixes,
    verify_storage,
    wrong_post_actions,
)
from tests.reliability.proxy import Rule
from tests.test_drain import build_drain

#: Azure's limit for all metadata of a blob (names and values together).
METADATA_LIMIT = 8 * 1024
VALUE_LIMIT = 1024
REJECTED = (
    b"HTTP/1.1 400 Value for one of the metadata is invalid.\r\nContent-Length: 0\r\n"
    b"x-ms-error-code: InvalidMetadata\r\nConnection: close\r\n\r\n"
)


def metadata_problems(env: dict[str, str]) -> list[str]:
    problems = []
    for blob in container_of(env).list_blobs(include=["metadata"]):
        if blob.name.startswith(".mail2blob/"):
            continue
        meta = {k: v or "" for k, v in (blob.metadata or {}).items()}
        total = sum(len(k) + len(v) for k, v in meta.items())
        if total > METADATA_LIMIT:
            problems.append(f"{blob.name}: metadata {total} bytes")
        for key, value in meta.items():
            if not all(" " <= ch <= "~" for ch in value):
                problems.append(f"{blob.name}: {key} not printable ASCII: {value[:60]!r}")
            if len(value) > VALUE_LIMIT:
                problems.append(f"{blob.name}: {key} is {len(value)} characters")
    return problems


def test_hostile_corpus_stored_byte_for_byte_and_one_failure_does_not_block(stack, fresh, proxies):
    corpus = hostile_messages()
    stack.dovecot.append_many([raw for _name, raw in corpus])
    served = Served.snapshot(stack.dovecot)
    assert len(served.bodies) == len(corpus)
    # Dovecot's rewrites, which is why blobs are compared with what it serves:
    nul = next(b for b in served.bodies.values() if b"nul" in b and b"\x80inside" in b)
    assert b"\x00" not in nul
    assert all(b"\n" not in b.replace(b"\r\n", b"") for b in served.bodies.values())

    # One upload fails (storage rejects it) in the first run.
    victim_uid = sorted(served.bodies)[11]  # the header-injection message
    victim = served.digests[victim_uid][:32].encode()
    blob = proxies.blob()
    blob.add(
        Rule(rb"PUT /devstoreaccount1/[^ ]*-" + victim + rb"\.eml", action="reply", reply=REJECTED)
    )
    env = proxies.env(fresh) | {"MAIL2BLOB_AFTER": "move:Archive"}

    first = build_drain(env, batch_messages=10).run()
    assert blob.fired() == 1
    assert [f.uid for f in first.failed] == [victim_uid]
    assert "InvalidMetadata" in first.failed[0].reason and "400" in first.failed[0].reason
    assert first.stored == len(corpus) - 1  # the others were not held up
    state = load_checkpoint(env)["folders"]["INBOX"]
    assert list(state["failed"]) == [str(victim_uid)]
    assert "InvalidMetadata" in state["failed"][str(victim_uid)]["reason"]
    prefixes = stored_prefixes(env)
    wrong = wrong_post_actions(stack.dovecot, served, "move:Archive", prefixes)
    assert stack.dovecot.folder_uids("INBOX") == [victim_uid]  # not moved: not stored

    second = build_drain(env).run()
    assert second.ok and second.stored == 1 and not second.failed, second.error
    assert load_checkpoint(env)["folders"]["INBOX"]["failed"] == {}

    figures = verify_storage(env, list(served.bodies.values()))
    wrong += final_mailbox_problems(stack.dovecot, served, "move:Archive")
    metadata = metadata_problems(env)
    subjects = {
        (b.metadata or {}).get("message_id"): unquote((b.metadata or {}).get("subject") or "")
        for b in container_of(env).list_blobs(include=["metadata"], name_starts_with="archive")
    }
    # 8-bit headers keep their text (UTF-8, else Latin-1); encoded CR/LF never reach a header
    assert subjects["<hostile-7@hostile.example>"] == "Grüße aus Köln – 東京 ✉"
    assert subjects["<hostile-8@hostile.example>"] == "café crème ÿþ"
    assert "\r" not in subjects["<hostile-12@hostile.example>"]
    report.record(
        "hostile",
        "corpus (MIME, charsets, RFC 2047, sizes, NUL, LF, names)",
        injected=len(corpus),
        expected=figures.expected,
        stored=figures.stored,
        duplicated=figures.duplicated + figures.unexpected,
        lost=figures.lost,
        wrong_post_actions=len(wrong),
        note=f"1 upload rejected, retried next run; {len(metadata)} metadata problems",
    )
    assert (figures.lost, figures.duplicated, figures.unexpected, figures.misnamed) == (0, 0, 0, 0)
    assert not wrong, wrong
    assert not metadata, metadata


def test_zero_length_message_served_is_stored_empty(stack, fresh, proxies):
    """Dovecot refuses to store an empty message; a server that serves one (the proxy rewrites a
    one-byte message's literal to ``{0}``) gets it stored as an empty blob."""
    stack.dovecot.append(b"Z")  # alone: its FETCH answer arrives in one read of the proxy
    imap = proxies.imap()
    imap.rewrite(rb"BODY\[\] \{1\}\r\nZ(?=[ )])", b"BODY[] {0}\r\n")
    env = proxies.env(fresh) | {"MAIL2BLOB_AFTER": "delete"}
    result = build_drain(env).run()
    assert imap.rewritten == 1
    figures = verify_storage(env, [b""])
    metadata = metadata_problems(env)
    report.record(
        "hostile",
        "zero-length message (served through the proxy)",
        injected=1,
        expected=figures.expected,
        stored=figures.stored,
        duplicated=figures.duplicated + figures.unexpected,
        lost=figures.lost,
        note="Dovecot refuses to store one",
    )
    assert result.ok, result.error
    assert (figures.lost, figures.duplicated, figures.unexpected) == (0, 0, 0)
    assert not metadata, metadata
    empty = [b for b in container_of(env).list_blobs(name_starts_with="archive") if b.size == 0]
    assert len(empty) == 1 and empty[0].name.endswith(f"-{sha(b'')[:32]}.eml")


@pytest.mark.slow
def test_50_mb_message(stack, fresh):
    big = huge_message(50)
    stack.dovecot.append_many([big, *(raw for _n, raw in hostile_messages()[:3])])
    served = Served.snapshot(stack.dovecot)
    env = fresh | {"MAIL2BLOB_AFTER": "seen"}
    result = build_drain(env).run()
    figures = verify_storage(env, list(served.bodies.values()))
    wrong = final_mailbox_problems(stack.dovecot, served, "seen")
    report.record(
        "hostile",
        f"{len(big) / 1e6:.0f} MB message",
        injected=1,
        expected=figures.expected,
        stored=figures.stored,
        duplicated=figures.duplicated + figures.unexpected,
        lost=figures.lost,
        wrong_post_actions=len(wrong),
        note="fetched in pieces, staged blocks",
    )
    assert result.ok and result.stored == len(served.bodies), result.error
    assert sha(big) in {sha(b) for b in served.bodies.values()}  # Dovecot served it unchanged
    assert (figures.lost, figures.duplicated, figures.unexpected) == (0, 0, 0)
    assert not wrong
