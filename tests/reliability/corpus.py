"""Hostile and odd messages, as real mailboxes hold them and as attackers write them.

Each entry is ``(name, raw bytes)``. The bytes are what gets APPENDed; Dovecot stores some of
them differently (it turns NUL into 0x80 and bare LF into CRLF), so tests compare blobs with what
Dovecot *serves*, not with these bytes.

Not in the list because Dovecot refuses to store it: a zero-length message ("Can't save a zero
byte message"); the zero-length case is served through the proxy instead (``test_hostile.py``).
The 50 MB message is built by :func:`huge_message`.
"""

from __future__ import annotations

import base64
import random

CRLF = b"\r\n"


def _msg(*headers: bytes | str, body: bytes | str = b"Hello.\r\n", sep: bytes = CRLF) -> bytes:
    head = [h.encode("utf-8") if isinstance(h, str) else h for h in headers]
    text = body.encode("utf-8") if isinstance(body, str) else body
    return sep.join(head) + sep + sep + text


def _std(n: int, subject: bytes | str = "", *extra: bytes | str) -> list[bytes | str]:
    """The usual headers of message ``n`` (unique Message-ID and Date)."""
    return [
        "From: Sender <sender@hostile.example>",
        "To: archive@contoso.example",
        f"Date: Mon, 2 Mar 2026 10:{n % 60:02d}:00 +0000",
        f"Message-ID: <hostile-{n}@hostile.example>",
        *([subject] if subject else []),
        *extra,
    ]


def _attachment(filename_param: str, n: int) -> bytes:
    boundary = f"b-{n}"
    name_param = filename_param.replace("filename", "name")
    payload = base64.encodebytes(b"%PDF-1.4 not really\n" * 20).replace(b"\n", CRLF)
    return _msg(
        *_std(n, "Subject: attachment name test"),
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        body=(
            f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n"
            f"--{boundary}\r\nContent-Type: application/pdf; {name_param}\r\n"
            f"Content-Disposition: attachment; {filename_param}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode("utf-8", "surrogateescape")
        + payload
        + f"--{boundary}--\r\n".encode(),
    )


def hostile_messages() -> list[tuple[str, bytes]]:
    rng = random.Random(6)
    long_name = "A" * 296 + ".pdf"
    messages: list[tuple[str, bytes]] = [
        # -- MIME structure
        (
            "boundary declared, never used",
            _msg(
                *_std(1, "Subject: broken boundary"),
                "MIME-Version: 1.0",
                'Content-Type: multipart/mixed; boundary="never-used"',
                body="Just text, no parts.\r\n",
            ),
        ),
        (
            "multipart without closing boundary",
            _msg(
                *_std(2, "Subject: unterminated multipart"),
                "MIME-Version: 1.0",
                'Content-Type: multipart/alternative; boundary="xx"',
                body="--xx\r\nContent-Type: text/plain\r\n\r\npart one\r\n--xx\r\nContent-Type:"
                " text/html\r\n\r\n<p>part two, never closed",
            ),
        ),
        (
            "nested boundary equal to the outer one",
            _msg(
                *_std(3, "Subject: nested same boundary"),
                "MIME-Version: 1.0",
                'Content-Type: multipart/mixed; boundary="same"',
                body='--same\r\nContent-Type: multipart/mixed; boundary="same"\r\n\r\n--same\r\n'
                "Content-Type: text/plain\r\n\r\ninner\r\n--same--\r\n--same--\r\n",
            ),
        ),
        ("headers only, no body separator", b"Subject: no body\r\nFrom: x@y.example\r\n"),
        ("body only, no headers", b"\r\nThis message has no header at all.\r\n"),
        ("one byte", b"x"),
        # -- 8-bit and charsets
        ("raw UTF-8 in headers", _msg(*_std(7, "Subject: Grüße aus Köln – 東京 ✉"))),
        (
            "Latin-1 bytes in headers (invalid UTF-8)",
            _msg(*_std(8, b"Subject: caf\xe9 cr\xe8me \xff\xfe"), b"From: J\xfcrgen <j@x.example>"),
        ),
        (
            "unknown charset in encoded-word",
            _msg(*_std(9, "Subject: =?x-klingon?Q?tlhIngan_Hol?= and =?utf-8?X?bad-encoding?=")),
        ),
        (
            "invalid base64 in encoded-word",
            _msg(*_std(10, "Subject: =?utf-8?B?!!!not*base64===?= tail")),
        ),
        (
            "unterminated encoded-word",
            _msg(*_std(11, "Subject: =?utf-8?Q?never_ends")),
        ),
        (
            "encoded CR LF (header injection into metadata)",
            _msg(
                *_std(
                    12,
                    "Subject: =?utf-8?Q?hi=0D=0Ax-ms-meta-evil:=20injected=0D=0A=0D=0Abody?=",
                ),
                "From: =?utf-8?Q?Eve=0D=0ABcc:=20everyone@contoso.example?= <eve@x.example>",
            ),
        ),
        (
            "encoded NUL, escape sequences and C1 controls",
            _msg(
                *_std(
                    13,
                    "Subject: =?utf-8?B?"
                    + base64.b64encode("a\x00b\x1b[31mred\x1b[0m\x85\u2028\u202e".encode()).decode()
                    + "?=",
                )
            ),
        ),
        (
            "very long encoded-word",
            _msg(
                *_std(
                    14, "Subject: =?utf-8?B?" + base64.b64encode(b"\xc3\xa9" * 3000).decode() + "?="
                )
            ),
        ),
        (
            "many adjacent encoded-words and folding",
            _msg(*_std(15, "Subject: " + "\r\n ".join(["=?iso-8859-1?Q?=E9t=E9?="] * 200))),
        ),
        # -- sizes and shapes
        ("huge Subject (200 KB)", _msg(*_std(16, "Subject: " + "S" * 200_000))),
        (
            "header block over 256 KB (3,000 Received lines)",
            _msg(
                *_std(17, "Subject: many received"),
                *[
                    f"Received: from relay{i}.example by mx.example; Mon, 2 Mar 2026"
                    for i in range(3000)
                ],
            ),
        ),
        ("a 1 MB line", _msg(*_std(18, "Subject: long line"), body=b"L" * 1_000_000 + CRLF)),
        # -- bytes Dovecot rewrites
        (
            "NUL bytes in headers and body",
            _msg(*_std(19, b"Subject: nul\x00inside"), body=b"body\x00with\x00nuls\r\n"),
        ),
        (
            "bare LF line endings",
            _msg(*_std(20, "Subject: bare LF"), body=b"line one\nline two\n", sep=b"\n"),
        ),
        (
            "bare CR and mixed line endings",
            _msg(*_std(21, "Subject: bare\rCR"), body=b"a\rb\r\nc\nd\r\r\n"),
        ),
        # -- missing and duplicated headers
        (
            "no Date, no Message-ID",
            _msg("From: a@b.example", "To: archive@contoso.example", "Subject: no date no id"),
        ),
        (
            "duplicate Message-ID (first)",
            _msg(
                "From: a@b.example",
                "Message-ID: <same@dup.example>",
                "Subject: dup 1",
                body="first body\r\n",
            ),
        ),
        (
            "duplicate Message-ID (second, other content)",
            _msg(
                "From: a@b.example",
                "Message-ID: <same@dup.example>",
                "Subject: dup 2",
                body="second body\r\n",
            ),
        ),
        (
            "two Subject headers",
            _msg(*_std(25, "Subject: first"), "Subject: second"),
        ),
        (
            "garbage Date and Message-ID",
            _msg(
                "From: a@b.example",
                "Date: Mon, 99 Foo 20261 99:99:99 +9999",
                "Message-ID: " + "<" + "x " * 600 + "\x07@y>",
                "Subject: garbage date",
            ),
        ),
        (
            "continuation line before any header, header without colon",
            b" leading continuation\r\nNot a header line\r\nSubject: odd\r\n\r\nbody\r\n",
        ),
        # -- attachment names
        ("attachment ../ traversal", _attachment('filename="../../../etc/passwd"', 28)),
        ("attachment absolute path", _attachment('filename="/etc/shadow"', 29)),
        ("attachment Windows path", _attachment('filename="C:\\Windows\\System32\\evil.exe"', 30)),
        ("attachment control characters", _attachment('filename="a\x07\x1b[2Jb\x7f.pdf"', 31)),
        ("attachment 300 characters", _attachment(f'filename="{long_name}"', 32)),
        (
            "attachment RFC 2231 encoded traversal",
            _attachment("filename*=utf-8''%2e%2e%2f%2e%2e%2fboot.ini", 33),
        ),
        (
            "attachment RFC 2047 name with NUL",
            _attachment('filename="=?utf-8?Q?evil=00.exe?="', 34),
        ),
        (
            "random binary body",
            _msg(
                *_std(35, "Subject: binary"), body=bytes(rng.randrange(1, 256) for _ in range(5000))
            ),
        ),
    ]
    return messages


def huge_message(size_mb: int = 50) -> bytes:
    """A message of about ``size_mb`` MB (a base64 attachment), built fast."""
    rng = random.Random(50)
    chunk = base64.encodebytes(rng.randbytes(57 * 1024)).replace(b"\n", CRLF)
    repeats = size_mb * 1024 * 1024 // len(chunk) + 1
    return _msg(
        *_std(50, f"Subject: {size_mb} MB"),
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="big"',
        body=b"--big\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
        b'\r\nContent-Disposition: attachment; filename="big.bin"\r\n\r\n'
        + chunk * repeats
        + b"--big--\r\n",
    )
