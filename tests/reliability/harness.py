"""What the reliability scenarios share: the mailbox as Dovecot serves it, the container's blobs
by content, the checks of the engine's promises, and the drain as a child process.

The promises checked (README "How a drain works"):

- every message stored exactly once, byte for byte as served (``verify_storage``);
- the checkpoint never ahead of storage: every UID at or below ``last_uid`` is stored or recorded
  as failed (``checkpoint_ahead``);
- a post-action only ever on a stored message, and the mailbox holding exactly what was not
  stored (``wrong_post_actions``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mail2blob import clients
from mail2blob.blob_destination import STATE_PREFIX
from mail2blob.checkpoint import CheckpointStore, MailboxLease
from mail2blob.settings import Settings

SEEN = b"\\Seen"
DELETED = b"\\Deleted"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def container_of(env: dict[str, str]) -> Any:
    return clients.container_client(Settings.from_env(env))


@dataclass
class Served:
    """The folder as Dovecot served it before the drain: what must end up stored."""

    bodies: dict[int, bytes]  # uid -> bytes as served
    flags: dict[int, tuple[bytes, ...]]

    @classmethod
    def snapshot(cls, dovecot: Any, folder: str = "INBOX") -> Served:
        fetched = dovecot.fetch_all(folder)
        return cls(
            {uid: m[b"BODY[]"] for uid, m in fetched.items()},
            {uid: tuple(m[b"FLAGS"]) for uid, m in fetched.items()},
        )

    @property
    def digests(self) -> dict[int, str]:
        return {uid: sha(body) for uid, body in self.bodies.items()}


def blob_names(env: dict[str, str]) -> list[str]:
    container = container_of(env)
    return [b.name for b in container.list_blobs() if not b.name.startswith(STATE_PREFIX)]


def stored_prefixes(env: dict[str, str]) -> set[str]:
    """The 32-hex-digit content hashes in the blob names (cheap: no download)."""
    return {name.rsplit("-", 1)[-1].removesuffix(".eml") for name in blob_names(env)}


def blob_count(container: Any, mailbox: str) -> int:
    return sum(1 for _ in container.list_blobs(name_starts_with=f"{mailbox}/"))


def blob_md5s(env: dict[str, str]) -> dict[str, str]:
    """Blob name -> MD5 of its content: the Content-MD5 the storage computed on upload (one
    listing, no download), or, for blobs without one (staged blocks), the MD5 of the download."""
    container = container_of(env)
    md5s: dict[str, str] = {}
    missing: list[str] = []
    for blob in container.list_blobs():
        if blob.name.startswith(STATE_PREFIX):
            continue
        md5 = blob.content_settings.content_md5
        if md5:
            md5s[blob.name] = bytes(md5).hex()
        else:
            missing.append(blob.name)
    with ThreadPoolExecutor(8) as pool:
        for name, md5 in zip(
            missing,
            pool.map(lambda n: md5_of(container.download_blob(n).readall()), missing),
            strict=True,
        ):
            md5s[name] = md5
    return md5s


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass
class StorageFigures:
    expected: int
    stored: int
    duplicated: int
    lost: int
    unexpected: int  # blobs whose content no served message has
    misnamed: int  # blobs whose name does not carry their content's SHA-256


def verify_storage(env: dict[str, str], expected_bodies: list[bytes]) -> StorageFigures:
    """Compare the container's blobs with the messages that had to be stored, by content (MD5:
    equal digests, equal bytes)."""
    blobs = blob_md5s(env)
    by_digest = Counter(blobs.values())
    bodies = {md5_of(body): body for body in expected_bodies}
    expected = Counter(md5_of(body) for body in expected_bodies)
    stored = sum(min(by_digest[d], n) for d, n in expected.items())
    duplicated = sum(max(by_digest[d] - n, 0) for d, n in expected.items())
    unexpected = sum(n for d, n in by_digest.items() if d not in expected)
    misnamed = sum(
        1
        for name, digest in blobs.items()
        if digest in bodies and not name.endswith(f"-{sha(bodies[digest])[:32]}.eml")
    )
    total = sum(expected.values())
    return StorageFigures(total, stored, duplicated, total - stored, unexpected, misnamed)


def load_checkpoint(env: dict[str, str]) -> dict[str, Any]:
    settings = Settings.from_env(env)
    store = CheckpointStore(container_of(env), settings.mailbox)
    return json.loads(store.load().to_json())


def checkpoint_ahead(env: dict[str, str], served: Served, prefixes: set[str]) -> list[int]:
    """UIDs at or below the checkpoint that are neither stored nor recorded as failed."""
    folder = load_checkpoint(env)["folders"].get("INBOX") or {}
    last_uid = int(folder.get("last_uid", 0))
    failed = set(folder.get("failed", {}))
    return [
        uid
        for uid, digest in served.digests.items()
        if uid <= last_uid and digest[:32] not in prefixes and str(uid) not in failed
    ]


def wrong_post_actions(
    dovecot: Any, served: Served, after: str, prefixes: set[str], *, target: str = "Archive"
) -> list[str]:
    """Every post-action on an unstored message, and every message the mailbox lost or holds
    in the wrong place; empty when all is well."""
    problems: list[str] = []
    inbox = dovecot.fetch_all("INBOX")
    digests = served.digests
    elsewhere: Counter[str] = Counter()
    if after.startswith("move:"):
        elsewhere = folder_digests(dovecot, target)
        for digest in elsewhere:
            if digest[:32] not in prefixes:
                problems.append(f"moved but not stored: {digest[:12]}")
    for uid, digest in digests.items():
        stored = digest[:32] in prefixes
        item = inbox.get(uid)
        if item is None:
            if after == "delete" and not stored:
                problems.append(f"uid {uid} deleted but not stored")
            elif after.startswith("move:") and not elsewhere[digest]:
                problems.append(f"uid {uid} gone from INBOX and not in {target}")
            elif after in ("keep", "seen"):
                problems.append(f"uid {uid} gone with after={after}")
            continue
        if item[b"BODY[]"] != served.bodies[uid]:
            problems.append(f"uid {uid} changed in the mailbox")
        added = set(item[b"FLAGS"]) - set(served.flags[uid])
        if SEEN in added and (after != "seen" or not stored):
            problems.append(f"uid {uid} marked seen (stored={stored}, after={after})")
        if DELETED in added and (after != "delete" or not stored):
            problems.append(f"uid {uid} flagged deleted (stored={stored}, after={after})")
        if after.startswith("move:") and stored and elsewhere[digest]:
            problems.append(f"uid {uid} both in INBOX and {target}")
    return problems


def folder_digests(dovecot: Any, folder: str) -> Counter[str]:
    """Content hashes of a folder's messages (none when the folder does not exist yet)."""
    if folder not in dovecot.folders():
        return Counter()
    return Counter(sha(m[b"BODY[]"]) for m in dovecot.fetch_all(folder).values())


def final_mailbox_problems(dovecot: Any, served: Served, after: str, target: str = "Archive"):
    """At the end every message is stored: the mailbox must reflect the post-action for all."""
    inbox = dovecot.fetch_all("INBOX")
    problems = []
    if after in ("delete",) or after.startswith("move:"):
        problems += [f"uid {uid} still in INBOX" for uid in inbox]
    if after.startswith("move:"):
        moved = folder_digests(dovecot, target)
        if moved != Counter(served.digests.values()):
            problems.append(f"{target} does not hold exactly the moved messages")
    if after == "seen":
        problems += [f"uid {u} not seen" for u, m in inbox.items() if SEEN not in m[b"FLAGS"]]
    if after == "keep" and (set(inbox) != set(served.bodies)):
        problems.append("INBOX changed with after=keep")
    return problems


def break_lease(env: dict[str, str]) -> bool:
    """End the lease a killed drain left behind, as its expiry (up to 60 s) would. Returns
    whether there was one."""
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob import BlobLeaseClient

    settings = Settings.from_env(env)
    lock = MailboxLease(container_of(env), settings.mailbox).blob_name
    blob = container_of(env).get_blob_client(lock)
    try:
        BlobLeaseClient(blob).break_lease(lease_break_period=0)
    except HttpResponseError:
        return False  # no lease (or no lock blob yet)
    return True


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
    return path


def child_environment() -> dict[str, str]:
    """The test process's environment (managed identity endpoint, CA trust) without MAIL2BLOB_*
    settings: the child reads those from its env file."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAIL2BLOB_")}


def start_drain_child(env_file: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mail2blob", "--env-file", str(env_file), *extra, "drain", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(),
        cwd=Path(__file__).resolve().parents[2],
    )


def child_result(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, dict, str]:
    """Exit status, the drain result and stderr of a finished child. ``drain --json`` prints one
    object per source, then a summary line; the result is the (one) source's object, or the
    summary when there is none."""
    out, err = process.communicate(timeout=timeout)
    objects = []
    for line in out.strip().splitlines():
        with contextlib.suppress(ValueError):
            objects.append(json.loads(line))
    per_source = [o for o in objects if isinstance(o, dict) and "complete" in o]
    result = per_source[0] if per_source else (objects[-1] if objects else {})
    return process.returncode, result, err
