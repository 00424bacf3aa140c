"""The destination: one blob container holding each message as a byte-exact ``.eml`` block blob.

Blob names are deterministic and content-addressed, so storing is idempotent: a message that is
already there (a rerun after a crash, a folder whose UIDVALIDITY changed) is detected by the
``overwrite=False`` conditional PUT itself, without a read first.

``<mailbox>/<folder>/<yyyy>/<mm>/<dd>/<yyyymmddThhmmssZ>-<sha256[:32]>.eml``, dated by the
message's INTERNALDATE (when the server received it) in UTC.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import enum
import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from .errors import DestinationError

logger = logging.getLogger(__name__)

CONTENT_TYPE = "message/rfc822"
#: Prefix of mail2blob's own state (checkpoints, leases, consent flows) inside the container.
STATE_PREFIX = ".mail2blob/"
_METADATA_VALUE_MAX = 1024
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f\\%#?]")
_FOLDING = re.compile(r"\r?\n[ \t]*")


class Outcome(enum.Enum):
    STORED = "stored"
    ALREADY_PRESENT = "already_present"


@dataclass(frozen=True)
class StoredBlob:
    name: str
    outcome: Outcome
    size: int


def blob_name(mailbox: str, folder: str, internaldate: datetime, sha256_hex: str) -> str:
    stamp = internaldate.strftime("%Y%m%dT%H%M%SZ")
    day = internaldate.strftime("%Y/%m/%d")
    return f"{_name_part(mailbox)}/{_folder_path(folder)}/{day}/{stamp}-{sha256_hex[:32]}.eml"


def _name_part(text: str) -> str:
    """One path segment, safe in a blob name and unambiguous (``%`` itself is escaped)."""
    escaped = _UNSAFE_NAME_CHARS.sub(lambda m: f"%{ord(m.group(0)):02X}", text)
    escaped = escaped.replace("/", "%2F")
    if escaped in ("", ".", ".."):
        escaped = escaped.replace(".", "%2E") or "%00"
    return escaped


def _folder_path(folder: str) -> str:
    # IMAP hierarchy ("INBOX/Invoices") becomes blob "directories".
    return "/".join(_name_part(part) for part in folder.split("/"))


def ascii_safe(text: str, limit: int = _METADATA_VALUE_MAX) -> str:
    """Metadata values travel as HTTP headers: printable ASCII only. Other characters are
    percent-encoded (UTF-8), so nothing is lost but length and header folding."""
    text = _FOLDING.sub(" ", text).strip()
    out = []
    for ch in text:
        if " " <= ch <= "~" and ch != "%":
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    # Never cut a %XX escape in half.
    return re.sub(r"%[0-9A-F]?$", "", "".join(out)[:limit])


def _decoded(value: Any) -> str:
    if value is None:
        return ""
    raw = str(value)
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:  # noqa: BLE001 - malformed encoded-words: keep the raw text
        return raw


def message_metadata(body: bytes | None, header_bytes: bytes | None = None) -> dict[str, str]:
    """message_id, from_addr, subject and date from the headers, decoded (RFC 2047) and made
    ASCII-safe. Never fails: a message with broken headers gets empty values."""
    head = header_bytes if header_bytes is not None else _header_block(body or b"")
    try:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    except Exception:  # noqa: BLE001
        return {"message_id": "", "from_addr": "", "subject": "", "date": ""}
    return {
        "message_id": ascii_safe(_decoded(parsed.get("Message-ID")), 512),
        "from_addr": ascii_safe(_decoded(parsed.get("From"))),
        "subject": ascii_safe(_decoded(parsed.get("Subject"))),
        "date": ascii_safe(_decoded(parsed.get("Date")), 128),
    }


def _header_block(body: bytes, limit: int = 256 * 1024) -> bytes:
    head = body[:limit]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end != -1:
            return head[: end + len(sep)]
    return head


class BlobDestination:
    """Writes messages into ``container`` (an ``azure.storage.blob.ContainerClient``)."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self.writes = 0  # write operations issued (PUTs), for the benchmark

    def ensure_container(self) -> None:
        from azure.core.exceptions import AzureError, ResourceExistsError

        try:
            self.container.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise DestinationError(
                f"cannot reach or create container {self.container.container_name!r}: "
                f"{_reason(exc)}"
            ) from None

    def store(
        self, name: str, data: bytes | IO[bytes], *, length: int, metadata: dict[str, str]
    ) -> StoredBlob:
        """Store one message; ``ALREADY_PRESENT`` when a blob of that name exists."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import ContentSettings

        try:
            self.writes += 1
            self.container.upload_blob(
                name,
                data,
                length=length,
                overwrite=False,
                metadata=metadata,
                content_settings=ContentSettings(content_type=CONTENT_TYPE),
            )
        except ResourceExistsError:
            return StoredBlob(name, Outcome.ALREADY_PRESENT, length)
        return StoredBlob(name, Outcome.STORED, length)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reason(exc: Exception) -> str:
    code = getattr(exc, "error_code", None) or type(exc).__name__
    status = getattr(exc, "status_code", None)
    return f"{code} (HTTP {status})" if status else f"{code}: {exc}"
