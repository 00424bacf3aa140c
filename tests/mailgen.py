"""Realistic sample mail for tests, the demo and the benchmark: plain and HTML bodies, non-ASCII
headers (RFC 2047), attachments, a spread of dates. Deterministic for a given seed."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime

_SENDERS = [
    ("Jürgen Müller", "juergen.mueller@lieferant.example"),
    ("Accounts Payable", "ap@fabrikam.example"),
    ("Zoë Ångström", "zoe@nordic.example"),
    ("佐藤 花子", "hanako@tokyo.example"),
    ("Orders", "orders@shop.example"),
]
_SUBJECTS = [
    "Invoice {n} for November",
    "Rechnung Nr. {n} – Bestellung",
    "Re: Order #{n} shipped ✈",
    "Quarterly report {n}",
    "請求書 {n}",
]
_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "invoice amount due payment terms delivery order quantity price total"
).split()


def make_message(
    n: int, *, rng: random.Random, size_kb: int = 20, attachment: bool = True
) -> bytes:
    name, address = rng.choice(_SENDERS)
    msg = EmailMessage()
    msg["From"] = f"{name} <{address}>"
    msg["To"] = "archive@contoso.example"
    msg["Subject"] = rng.choice(_SUBJECTS).format(n=n)
    # Spread over Jan-Jul 2026: in the past, so servers keep it as INTERNALDATE.
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(0, 300_000))
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = f"<m{n}.{rng.randrange(10**9)}@mail2blob.test>"
    words = max(size_kb * 1024 // 7 // (2 if attachment else 1), 20)
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    msg.set_content(f"Hello,\n\n{text}\n\nRegards,\n{name}\n")
    if rng.random() < 0.5:
        msg.add_alternative(f"<html><body><p>{text}</p></body></html>", subtype="html")
    if attachment:
        blob = rng.randbytes(size_kb * 1024 // 2)
        kind = rng.choice([("application", "pdf", "pdf"), ("text", "csv", "csv")])
        if kind[0] == "text":
            msg.add_attachment(
                "\n".join(f"{i};{rng.randrange(1000)}" for i in range(size_kb * 10)),
                subtype="csv",
                filename=f"items-{n}.csv",
            )
        else:
            msg.add_attachment(blob, maintype=kind[0], subtype=kind[1], filename=f"invoice-{n}.pdf")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def make_messages(count: int, *, seed: int = 1, size_kb: int = 20) -> list[bytes]:
    rng = random.Random(seed)
    return [
        make_message(
            n,
            rng=rng,
            size_kb=rng.randint(max(size_kb // 2, 2), size_kb * 2 // 1),
            attachment=rng.random() < 0.7,
        )
        for n in range(1, count + 1)
    ]


def make_large_message(size_mb: int, *, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    msg = EmailMessage()
    msg["From"] = "Scanner <scanner@contoso.example>"
    msg["To"] = "archive@contoso.example"
    msg["Subject"] = f"Scan of {size_mb} MB"
    msg["Date"] = format_datetime(datetime(2026, 3, 1, 12, tzinfo=UTC))
    msg["Message-ID"] = f"<large{size_mb}.{seed}@mail2blob.test>"
    msg.set_content("Scanned document attached.\n")
    msg.add_attachment(
        rng.randbytes(size_mb * 1024 * 1024 * 3 // 4),
        maintype="application",
        subtype="pdf",
        filename="scan.pdf",
    )
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
