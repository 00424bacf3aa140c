"""``make bench``: mail2blob's drain side by side with the storage ceiling and mbsync.

One run starts the local stack, seeds its mailbox with N messages (realistic 10-70 KB MIME from
``tests/mailgen`` plus a few of 10-50 MB), then, per repeat and each on a fresh server:

1. **drain**: ``python -m mail2blob drain`` in a child process, the real code path (token cache
   from the Key Vault stand-in, MSAL refresh, XOAUTH2 login to Dovecot) into a fresh Azurite. Its
   CPU seconds come from ``wait4()``, its peak RSS from ``VmHWM``; its time is the run's own
   ``seconds`` (the process's wall time is reported too).
2. **ceiling**: the same PUTs (names, bytes, metadata, block sizes, conditional) sent to a fresh
   Azurite straight from memory with mail2blob's own blob client, no IMAP, at the best of a few
   concurrencies tried on a sample first: async (``azure.storage.blob.aio``) and threads.
3. **mbsync** (Debian isync) pulling the same mailbox into a Maildir, with its default
   ``FSync yes`` and with ``FSync no``. It logs in with the seeding master user (``LOGIN``):
   XOAUTH2 in mbsync needs a Cyrus SASL plugin Debian does not ship.

Azurite slows down as it fills, so drain and ceiling always start from an empty instance and store
the same number of blobs. Storage writes are counted from Azurite's debug log: every request that
is not a read (PUTs, staged blocks, block lists, container creation, checkpoint and lease calls).

Prints a Markdown table of medians over the repeats and, last, one machine-readable line::

    drain/ceiling=X.XX drain/mbsync=X.XX peak_rss_mb=N writes_per_msg=X.XX import_s=X.XX

The ratios are medians of per-repeat ratios (each repeat runs its contenders back to back, so load
from elsewhere on the machine mostly cancels out); ``peak_rss_mb`` is the highest of the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.stack.azurite import Azurite
    from tests.stack.local_stack import Stack

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Azurite operations (``Blob_Download``...) that only read, by the verb after the
#: underscore; every other request counts as a write.
READ_VERBS = ("Get", "List", "Download", "Query")
CALIBRATION = {"aio": (16, 32, 64), "threads": (8, 16)}
CALIBRATION_SAMPLE = 800
MB = 1e6


@dataclass
class Figures:
    """One contender in one repeat."""

    name: str
    messages: int
    bytes: int
    seconds: float
    cpu_s: float = math.nan
    peak_rss_mb: float = math.nan
    writes: int | None = None
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    #: storage requests by Azurite operation
    operations: Counter[str] = field(default_factory=Counter)

    @property
    def msg_s(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.seconds

    @property
    def writes_per_msg(self) -> float:
        return self.writes / self.messages if self.writes is not None else math.nan


# -- the mailbox ------------------------------------------------------------------------------


def default_large_mb(messages: int) -> list[int]:
    """A few large messages, the biggest 50 MB (the memory target is stated with those)."""
    if messages >= 5000:
        return [50, 25, 12, 10]
    if messages >= 1000:
        return [50, 12]
    return []


def build_corpus(messages: int, large_mb: Sequence[int], seed: int = 2026) -> list[bytes]:
    """``messages`` realistic messages, ``large_mb`` of them large, spread through the mailbox."""
    from tests.mailgen import make_large_message, make_messages

    large = [make_large_message(size, seed=seed + n) for n, size in enumerate(large_mb)]
    corpus = make_messages(messages - len(large), seed=seed)
    for n, body in enumerate(large):
        corpus.insert((n + 1) * len(corpus) // (len(large) + 1), body)
    return corpus


# -- measuring processes ----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and its descendants, including children it already reaped, so
    the difference of two readings is what the tree spent in between."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    total = 0
    with contextlib.suppress(OSError):
        fields = _stat_fields(root)
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            total += sum(int(f) for f in _stat_fields(pid)[11:13])
        todo.extend(children.get(pid, []))
    return total / ticks


@dataclass
class ChildRun:
    returncode: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def peak_rss_mb(pid: int | str = "self") -> float:
    """``VmHWM``: the peak resident set of the process since its ``exec`` (``ru_maxrss`` of a
    child also counts the parent's memory it shared between fork and exec)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


def run_child(
    command: Sequence[str], directory: Path, env: dict[str, str] | None = None
) -> ChildRun:
    """Run ``command``; its CPU time from ``wait4()``, its peak RSS sampled while it runs."""
    out, err = directory / "child.out", directory / "child.err"
    peak = 0.0
    with out.open("wb") as stdout, err.open("wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, peak_rss_mb(process.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        process.returncode,
        seconds,
        usage.ru_utime + usage.ru_stime,
        peak,
        out.read_text(errors="replace"),
        err.read_text(errors="replace"),
    )


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_env() -> dict[str, str]:
    """The environment for a child, without settings that would override its env file."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAIL2BLOB_")}


# -- storage ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_azurite(workdir: Path, name: str) -> Iterator[tuple[Azurite, Counter[str]]]:
    """An empty Azurite with a debug log; the counter is filled with the requests it served
    (by operation) once the block ends."""
    from tests.stack.azurite import Azurite

    directory = workdir / name
    azurite = Azurite(directory, debug_log=directory / "debug.log")
    azurite.start()
    operations: Counter[str] = Counter()
    try:
        yield azurite, operations
    finally:
        azurite.stop()
        operations.update(azurite.operations())
        operations.pop("Service_ListContainersSegment", None)  # the readiness probe
        shutil.rmtree(directory, ignore_errors=True)


def count_writes(operations: Counter[str]) -> int:
    return sum(n for op, n in operations.items() if not op.partition("_")[2].startswith(READ_VERBS))


def aio_available() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Blob:
    name: str
    body: bytes
    metadata: dict[str, str]


def drain_blobs(corpus: list[bytes], mailbox: str) -> list[Blob]:
    """What the drain PUTs for each message (name, bytes, metadata), computed up front so the
    ceiling pays only for storing it."""
    from mail2blob.blob_destination import blob_name, message_metadata, sha256_hex

    now = datetime.now(UTC).replace(microsecond=0)
    blobs = []
    for uid, body in enumerate(corpus, 1):
        digest = sha256_hex(body)
        metadata = message_metadata(body)
        metadata.update(
            size=str(len(body)),
            sha256=digest,
            internaldate=now.isoformat(),
            folder="INBOX",
            uid=str(uid),
            uidvalidity="1",
        )
        blobs.append(Blob(blob_name(mailbox, "INBOX", now, digest), body, metadata))
    return blobs


def _upload_kwargs() -> dict[str, Any]:
    from azure.storage.blob import ContentSettings

    from mail2blob.blob_destination import CONTENT_TYPE

    return {"overwrite": False, "content_settings": ContentSettings(content_type=CONTENT_TYPE)}


def upload_threads(settings_env: dict[str, str], blobs: list[Blob], concurrency: int) -> float:
    """Upload with mail2blob's own blob client (the sync SDK) from a thread pool."""
    from mail2blob import clients
    from mail2blob.settings import Settings

    container = clients.container_client(Settings.from_env(settings_env))
    container.create_container()
    kwargs = _upload_kwargs()

    def put(blob: Blob) -> None:
        container.upload_blob(blob.name, blob.body, metadata=blob.metadata, **kwargs)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(put, blobs))
    seconds = time.perf_counter() - start
    container.close()
    return seconds


def upload_aio(settings_env: dict[str, str], blobs: list[Blob], concurrency: int) -> float:
    """Upload with mail2blob's async blob client (``azure.storage.blob.aio``, needs aiohttp),
    ``concurrency`` requests in flight."""
    from mail2blob import clients
    from mail2blob.settings import Settings

    settings = Settings.from_env(settings_env)
    kwargs = _upload_kwargs()

    async def main() -> float:
        async with clients.container_client(settings, aio=True) as container:
            await container.create_container()
            gate = asyncio.Semaphore(concurrency)

            async def put(blob: Blob) -> None:
                async with gate:
                    await container.upload_blob(
                        blob.name, blob.body, metadata=blob.metadata, **kwargs
                    )

            start = time.perf_counter()
            await asyncio.gather(*(put(blob) for blob in blobs))
            return time.perf_counter() - start

    return asyncio.run(main())


UPLOADERS: dict[str, Callable[[dict[str, str], list[Blob], int], float]] = {
    "aio": upload_aio,
    "threads": upload_threads,
}


def run_ceiling(
    stack: Stack, blobs: list[Blob], workdir: Path, mode: str, concurrency: int
) -> Figures:
    with fresh_azurite(workdir, "azurite-ceiling") as (azurite, operations):
        azurite_pid = azurite._process.pid  # type: ignore[union-attr]
        settings_env = stack.env(storage=azurite.connection_string, container="ceiling")
        cpu0, server0 = _self_cpu_s(), tree_cpu_s(azurite_pid)
        seconds = UPLOADERS[mode](settings_env, blobs, concurrency)
        cpu, server = _self_cpu_s() - cpu0, tree_cpu_s(azurite_pid) - server0
    return Figures(
        f"storage ceiling: SDK from memory ({mode}, {concurrency} in flight)",
        len(blobs),
        sum(len(blob.body) for blob in blobs),
        seconds,
        cpu_s=cpu,
        writes=count_writes(operations),
        server_cpu_s={"azurite": server},
        operations=operations,
    )


def calibrate(
    stack: Stack, blobs: list[Blob], workdir: Path, modes: Sequence[str]
) -> tuple[str, int]:
    """The fastest (mode, concurrency) for a sample of small messages on fresh instances."""
    sample = [blob for blob in blobs if len(blob.body) < 1_000_000][:CALIBRATION_SAMPLE]
    rates: dict[tuple[str, int], float] = {}
    for mode in modes:
        for concurrency in CALIBRATION[mode]:
            figures = run_ceiling(stack, sample, workdir, mode, concurrency)
            rates[mode, concurrency] = figures.msg_s
            print(f"  calibration: {mode} x{concurrency}: {figures.msg_s:.0f} msg/s", flush=True)
    return max(rates, key=lambda key: rates[key])


# -- the drain --------------------------------------------------------------------------------


def run_drain(stack: Stack, workdir: Path, expected: int, total_bytes: int) -> Figures:
    from tests.stack.local_stack import env_file_text

    with fresh_azurite(workdir, "azurite-drain") as (azurite, operations):
        env_file = workdir / "drain.env"
        env_file.write_text(
            env_file_text(stack, storage=azurite.connection_string, time_budget="3600")
        )
        stats_file = workdir / "drain-stats.json"
        azurite_pid = azurite._process.pid  # type: ignore[union-attr]
        dovecot_pid = stack.dovecot._process.pid
        servers0 = tree_cpu_s(azurite_pid), tree_cpu_s(dovecot_pid)
        child = run_child(
            [
                sys.executable,
                "-m",
                "bench.drain_bench",
                "--drain-child",
                str(env_file),
                "--stats-out",
                str(stats_file),
            ],
            workdir,
            child_env(),
        )
        servers = tree_cpu_s(azurite_pid) - servers0[0], tree_cpu_s(dovecot_pid) - servers0[1]
    result = _drain_result(child.stdout)
    if child.returncode != 0 or not result.get("ok") or result.get("stored") != expected:
        raise SystemExit(
            f"the drain failed (exit {child.returncode}): stored {result.get('stored')} of "
            f"{expected}, error {result.get('error')!r}\n{child.stderr[-3000:]}"
        )
    if result.get("bytes") != total_bytes:
        raise SystemExit(f"the drain stored {result.get('bytes')} bytes, not {total_bytes}")
    stats = json.loads(stats_file.read_text())
    return Figures(
        "mail2blob drain: IMAP (XOAUTH2) to Azurite",
        expected,
        total_bytes,
        result["seconds"],
        cpu_s=child.cpu_s,
        peak_rss_mb=max(child.peak_rss_mb, stats["peak_rss_mb"]),
        writes=count_writes(operations),
        operations=operations,
        server_cpu_s={"azurite": servers[0], "dovecot": servers[1]},
        extra={
            "process_s": child.seconds,
            "run_cpu_s": stats["cpu_s"],
            "imap_busy": stats["imap_s"] / result["seconds"],
            "waiting_for_uploads": stats["finish_s"] / result["seconds"],
        },
    )


def _drain_result(stdout: str) -> dict[str, Any]:
    """The run's result from ``drain --json``: the JSON line of the one source drained (a line
    with ``seconds``; a totals line may follow it)."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and "seconds" in data:
                return data
    return {}


def drain_child(env_file: str, stats_out: str) -> int:
    """``python -m mail2blob --env-file ENV drain --json --quiet`` in this process, recording
    how long the IMAP connection had a command in progress and how long the drain loop waited
    for a batch's uploads (and checkpoint)."""
    from mail2blob import cli
    from mail2blob.drain import Drain
    from mail2blob.imap_source import ImapSource

    spent = {"imap_s": 0.0, "finish_s": 0.0}

    def timed(cls: type, name: str, key: str) -> None:
        original = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        setattr(cls, name, wrapper)

    timed(ImapSource, "_call", "imap_s")
    timed(Drain, "_finish", "finish_s")
    cpu = _self_cpu_s()
    code = cli.main(["--env-file", env_file, "drain", "--json", "--quiet"])
    spent["cpu_s"] = _self_cpu_s() - cpu
    spent["peak_rss_mb"] = peak_rss_mb()
    Path(stats_out).write_text(json.dumps(spent))
    return code


# -- mbsync -----------------------------------------------------------------------------------

_MBSYNCRC = """\
FSync {fsync}

IMAPAccount bench
Host {host}
Port {port}
User {user}
Pass {password}
AuthMechs LOGIN
SSLType IMAPS
SystemCertificates no
CertificateFile {ca}

IMAPStore far
Account bench

MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX

Channel bench
Far :far:
Near :near:
Patterns INBOX
Create Near
Sync Pull
Expunge None
SyncState *
"""


def run_mbsync(stack: Stack, workdir: Path, corpus: list[bytes], *, fsync: bool) -> Figures:
    """mbsync stores messages with LF line ends and adds an ``X-TUID`` header line (21 bytes),
    so the check allows for both."""
    from tests.stack import constants as c

    directory = workdir / "mbsync"
    shutil.rmtree(directory, ignore_errors=True)
    maildir = directory / "maildir"
    maildir.mkdir(parents=True)
    config = directory / "mbsyncrc"
    config.write_text(
        _MBSYNCRC.format(
            fsync="yes" if fsync else "no",
            host=stack.dovecot.host,
            port=stack.dovecot.port,
            user=f"{c.MAILBOX}*{c.SEED_MASTER_USER}",
            password=c.SEED_MASTER_PASSWORD,
            ca=stack.ca.ca_cert_path,
            maildir=maildir,
        )
    )
    config.chmod(0o600)
    dovecot_pid = stack.dovecot._process.pid
    server0 = tree_cpu_s(dovecot_pid)
    child = run_child(["mbsync", "-q", "-c", str(config), "bench"], directory)
    server = tree_cpu_s(dovecot_pid) - server0
    files = [p for sub in ("new", "cur") for p in (maildir / "INBOX" / sub).glob("*")]
    stored = sum(p.stat().st_size for p in files)
    shutil.rmtree(directory, ignore_errors=True)
    if child.returncode != 0 or len(files) != len(corpus):
        raise SystemExit(
            f"mbsync failed (exit {child.returncode}): {len(files)} of {len(corpus)} messages\n"
            f"{child.stderr[-3000:]}"
        )
    with_lf = sum(len(body) - body.count(b"\r\n") for body in corpus)
    if not 0 <= stored - with_lf <= 32 * len(corpus):
        raise SystemExit(f"mbsync stored {stored} bytes, not about {with_lf}")
    return Figures(
        f"mbsync: IMAP (LOGIN) to a Maildir, FSync {'yes' if fsync else 'no'}",
        len(corpus),
        sum(map(len, corpus)),
        child.seconds,
        cpu_s=child.cpu_s,
        peak_rss_mb=child.peak_rss_mb,
        server_cpu_s={"dovecot": server},
    )


# -- cold imports -----------------------------------------------------------------------------

FIRST_DRAIN_IMPORTS = (
    "import function_app, mail2blob.drain, mail2blob.clients, mail2blob.tokens, imapclient, "
    "azure.storage.blob, azure.identity, azure.keyvault.secrets"
)


def import_seconds(statement: str) -> float:
    """Wall time of ``python -c STATEMENT`` in a new interpreter (interpreter start included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], cwd=REPO_ROOT, env=child_env(), check=True)
    return time.perf_counter() - start


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Report:
    messages: int
    bytes: int
    large_mb: list[int]
    seed_s: float
    repeats: list[dict[str, Figures]]
    import_s: list[float]
    first_drain_import_s: list[float]
    #: the machine's 1-minute load average before and after the repeats (other work on it
    #: shows here: the figures assume the benchmark has the two cores to itself)
    load: tuple[float, float] = (math.nan, math.nan)

    def median(self, key: str, value: Callable[[Figures], float]) -> float:
        return statistics.median(value(run[key]) for run in self.repeats)

    def ratio(self, over: str) -> float:
        return statistics.median(run["drain"].msg_s / run[over].msg_s for run in self.repeats)

    @property
    def peak_rss_mb(self) -> float:
        return max(run["drain"].peak_rss_mb for run in self.repeats)

    def last_line(self) -> str:
        return (
            f"drain/ceiling={self.ratio('ceiling'):.2f} drain/mbsync={self.ratio('mbsync'):.2f} "
            f"peak_rss_mb={round(self.peak_rss_mb)} "
            f"writes_per_msg={self.median('drain', lambda f: f.writes_per_msg):.2f} "
            f"import_s={statistics.median(self.import_s):.2f}"
        )

    def table(self) -> str:
        def fmt(value: float, digits: int = 0) -> str:
            return "" if math.isnan(value) else f"{value:,.{digits}f}"

        rows = [
            "| run | msg/s | MB/s | seconds | client CPU s | client CPU ms/msg | peak RSS MB "
            "| writes/msg | server CPU s |",
            "|---|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for key in self.repeats[0]:
            first = self.repeats[0][key]
            servers = ", ".join(
                f"{name} {self.median(key, lambda f, n=name: f.server_cpu_s[n]):.1f}"
                for name in first.server_cpu_s
            )
            rss = max(run[key].peak_rss_mb for run in self.repeats)
            rows.append(
                f"| {first.name} | {fmt(self.median(key, lambda f: f.msg_s))} "
                f"| {fmt(self.median(key, lambda f: f.mb_s), 1)} "
                f"| {fmt(self.median(key, lambda f: f.seconds), 1)} "
                f"| {fmt(self.median(key, lambda f: f.cpu_s), 1)} "
                f"| {fmt(self.median(key, lambda f: f.cpu_s / f.messages * 1000), 2)} "
                f"| {fmt(rss)} "
                f"| {fmt(self.median(key, lambda f: f.writes_per_msg), 3)} | {servers} |"
            )
        return "\n".join(rows)

    def details(self) -> str:
        drain = self.repeats
        extra = {
            name: statistics.median(run["drain"].extra[name] for run in drain)
            for name in drain[0]["drain"].extra
        }
        per_repeat = "; ".join(
            f"#{n}: drain {run['drain'].msg_s:.0f}, ceiling {run['ceiling'].msg_s:.0f}, "
            f"mbsync {run['mbsync'].msg_s:.0f} msg/s"
            for n, run in enumerate(drain, 1)
        )
        return (
            f"- mailbox: {self.messages} messages, {self.bytes / MB:.1f} MB "
            f"(large: {', '.join(f'{m} MB' for m in self.large_mb) or 'none'}); "
            f"seeded over IMAP in {self.seed_s:.1f} s\n"
            f"- repeats: {len(drain)} ({per_repeat}); machine load average "
            f"{self.load[0]:.1f} before, {self.load[1]:.1f} after\n"
            f"- drain: process {extra['process_s']:.1f} s (interpreter, imports, token "
            f"included), CPU in the run itself {extra['run_cpu_s']:.1f} s; IMAP connection "
            f"busy {extra['imap_busy']:.0%} of the run, drain loop waiting for uploads "
            f"{extra['waiting_for_uploads']:.0%}\n"
            f"- drain requests: {_operations(drain[0]['drain'])}\n"
            f"- ceiling requests: {_operations(drain[0]['ceiling'])}\n"
            f"- `python -c 'import function_app'`: {statistics.median(self.import_s):.2f} s; "
            f"with everything a first drain imports: "
            f"{statistics.median(self.first_drain_import_s):.2f} s"
        )


def _operations(figures: Figures) -> str:
    ops = ", ".join(f"{op} {n}" for op, n in sorted(figures.operations.items()))
    return f"{figures.writes} writes for {figures.messages} messages ({ops})"


def run_benchmark(
    stack: Stack,
    workdir: Path,
    *,
    messages: int,
    repeats: int,
    large_mb: list[int],
    ceiling: tuple[str, int] | None,
    import_repeats: int,
) -> Report:
    print(f"building {messages} messages (large: {large_mb or 'none'} MB)...", flush=True)
    corpus = build_corpus(messages, large_mb)
    total = sum(map(len, corpus))
    os.environ.update(stack.azure_env())
    stack.consent()
    started = time.perf_counter()
    stack.dovecot.append_many(corpus)
    seed_s = time.perf_counter() - started
    if len(stack.dovecot.folder_uids()) != messages:
        raise SystemExit("the mailbox does not hold exactly the seeded messages; start empty")
    print(f"seeded {messages} messages, {total / MB:.1f} MB, in {seed_s:.1f} s", flush=True)

    from tests.stack import constants as c

    blobs = drain_blobs(corpus, c.MAILBOX)
    modes = ["aio", "threads"] if aio_available() else ["threads"]
    mode, concurrency = ceiling or calibrate(stack, blobs, workdir, modes)
    contenders: dict[str, Callable[[], Figures]] = {
        "drain": lambda: run_drain(stack, workdir, messages, total),
        "ceiling": lambda: run_ceiling(stack, blobs, workdir, mode, concurrency),
        "mbsync": lambda: run_mbsync(stack, workdir, corpus, fsync=True),
        "mbsync_nofsync": lambda: run_mbsync(stack, workdir, corpus, fsync=False),
    }
    load_before = os.getloadavg()[0]
    runs: list[dict[str, Figures]] = []
    for number in range(1, repeats + 1):
        # Every other repeat in reverse order, so a trend in the machine's load evens out.
        order = list(contenders) if number % 2 else list(reversed(contenders))
        done = {key: contenders[key]() for key in order}
        run = {key: done[key] for key in contenders}
        runs.append(run)
        print(
            f"repeat {number}/{repeats}: "
            + ", ".join(f"{key} {f.msg_s:.0f} msg/s" for key, f in run.items()),
            flush=True,
        )
    imports = [import_seconds("import function_app") for _ in range(import_repeats)]
    first_drain = FIRST_DRAIN_IMPORTS + (
        ", azure.storage.blob.aio, aiohttp" if aio_available() else ""
    )
    first = [import_seconds(first_drain) for _ in range(import_repeats)]
    load = (load_before, os.getloadavg()[0])
    return Report(messages, total, large_mb, seed_s, runs, imports, first, load)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages in the mailbox")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender")
    parser.add_argument(
        "--large-mb",
        help="comma-separated sizes of the large messages among them, in MB ('' for none; "
        "default 50,12 from 1000 messages, 50,25,12,10 from 5000)",
    )
    parser.add_argument(
        "--ceiling",
        help="MODE:CONCURRENCY of the ceiling, e.g. aio:64 or threads:8 (default: the fastest "
        "of aio (with aiohttp) and threads at a few concurrencies, tried on a sample first)",
    )
    parser.add_argument("--import-repeats", type=int, default=5)
    parser.add_argument("--workdir", help="keep working files here (default: a temp dir)")
    parser.add_argument("--drain-child", help=argparse.SUPPRESS)
    parser.add_argument("--stats-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.large_mb is None:
        args.large = default_large_mb(args.messages)
    else:
        args.large = [int(x) for x in args.large_mb.split(",") if x.strip()]
    if len(args.large) >= args.messages:
        parser.error("--large-mb names more messages than --messages")
    if args.ceiling:
        mode, _, concurrency = args.ceiling.partition(":")
        if mode not in UPLOADERS or not concurrency.isdigit():
            parser.error("--ceiling is MODE:CONCURRENCY with MODE aio or threads")
        args.ceiling = (mode, int(concurrency))
    return args


def main(argv: Sequence[str] | None = None, *, stack: Stack | None = None) -> int:
    """Run the benchmark; with ``stack`` (tests) on that stack instead of a new one."""
    args = parse_args(argv)
    if args.drain_child:
        return drain_child(args.drain_child, args.stats_out)
    with contextlib.ExitStack() as cleanup:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="m2b-bench-")))
        if stack is None:
            from tests.stack.local_stack import start_local_stack

            print("starting the local stack...", flush=True)
            stack, stop = start_local_stack(workdir / "stack")
            cleanup.callback(stop)
        report = run_benchmark(
            stack,
            workdir,
            messages=args.messages,
            repeats=args.repeats,
            large_mb=args.large,
            ceiling=args.ceiling,
            import_repeats=args.import_repeats,
        )
    print()
    print(report.table())
    print()
    print(report.details())
    print(report.last_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
