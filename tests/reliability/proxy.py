"""A small TCP proxy of the tests' own, between the engine and one server, that breaks things on
cue: it cuts a connection a chosen number of bytes after a phase starts, answers a command itself
(Exchange Online's throttling and ``BYE`` lines, which Dovecot never sends), stalls a connection
(timeouts), refuses new connections, or rewrites bytes the server sends.

It runs asyncio in a background thread. With ``tls_server``/``tls_upstream`` it terminates TLS on
both sides (a certificate from the test CA, which the engine trusts through
``MAIL2BLOB_CA_BUNDLE``), so rules see IMAP commands and HTTP requests in the clear.

A :class:`Rule` waits for its ``trigger`` (a regular expression over the bytes of one direction:
``c2s`` client to server, ``s2c`` server to client) on any connection, then acts once (or
``times`` times):

- ``cut``: let ``after`` more bytes through on the ``cut`` direction (counted from the end of the
  trigger when both directions are the same), then drop the connection;
- ``reply``: swallow the trigger and send ``reply`` (``{tag}`` filled from a named group) back to
  the client instead; ``close`` drops the connection afterwards;
- ``stall``: from the trigger on, forward nothing in either direction and keep the connection open;
- ``drop``: drop the connection at the trigger, forwarding nothing of it;
- ``notify``: call ``callback(match)`` for every occurrence and forward everything unchanged (the
  crash tests kill the drain at the n-th upload this way).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

Direction = Literal["c2s", "s2c"]
Action = Literal["cut", "reply", "stall", "drop", "notify"]
_WINDOW = 8192  # bytes of each direction kept for matching triggers across reads
_OTHER: dict[str, Direction] = {"c2s": "s2c", "s2c": "c2s"}

#: IMAP commands as imaplib sends them (``<tag> <command>``), for triggers.
IMAP_LOGIN = rb"(?m)^(?P<tag>[A-Z]+\d+) AUTHENTICATE "
IMAP_SELECT = rb"(?m)^(?P<tag>[A-Z]+\d+) SELECT "
IMAP_FETCH_BODY = rb"(?m)^(?P<tag>[A-Z]+\d+) UID FETCH [^\r\n]*BODY\.PEEK\[\]"
IMAP_MOVE = rb"(?m)^(?P<tag>[A-Z]+\d+) UID MOVE "
IMAP_POST_ACTION = rb"(?m)^(?P<tag>[A-Z]+\d+) UID (?:MOVE|STORE|EXPUNGE|COPY) "
#: Azure Blob requests (Azurite's path style: /<account>/<container>/<blob>).
BLOB_MESSAGE_PUT = rb"PUT /devstoreaccount1/[^ ]+\.eml[? ]"
BLOB_CHECKPOINT_PUT = rb"PUT /devstoreaccount1/[^ ]+/\.mail2blob/state/"
#: Exchange Online's answers that Dovecot does not give.
THROTTLED = b"{tag} NO Request is throttled. Suggested Backoff Time: {ms} milliseconds\r\n"
BYE_TOKEN_EXPIRED = b"* BYE Session invalidated - AccessTokenExpired\r\n"


@dataclass
class Rule:
    trigger: bytes
    action: Action = "cut"
    direction: Direction = "c2s"
    cut: Direction = "s2c"
    after: int = 0
    reply: bytes = b""
    close: bool = False
    times: int | None = 1
    name: str = ""
    callback: Callable[[re.Match[bytes]], None] | None = field(default=None, repr=False)
    fired: int = 0
    pattern: re.Pattern[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pattern = re.compile(self.trigger)
        self.name = self.name or f"{self.action} on {self.trigger!r}"

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times


@dataclass(eq=False)
class _Conn:
    number: int
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    window: dict[str, bytes] = field(default_factory=lambda: {"c2s": b"", "s2c": b""})
    budget: dict[str, int | None] = field(default_factory=lambda: {"c2s": None, "s2c": None})
    stalled: bool = False
    closed: bool = False

    def abort(self) -> None:
        self.closed = True
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()


class Proxy:
    """Listens on ``127.0.0.1:<free port>`` and forwards to ``upstream_host:upstream_port``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        tls_server: ssl.SSLContext | None = None,
        tls_upstream: ssl.SSLContext | None = None,
        name: str = "proxy",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.name = name
        self._tls_server = tls_server
        self._tls_upstream = tls_upstream
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._rewrites: list[tuple[re.Pattern[bytes], bytes]] = []
        self._conns: set[_Conn] = set()
        self._numbers = itertools.count(1)
        self._refusing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.rewritten = 0  # substitutions made by rewrite()
        #: ``(rule name, connection number)`` for every rule that fired, in order.
        self.events: list[tuple[str, int]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Proxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{self.name}-loop", daemon=True
        )
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._handle, self.host, self.port, ssl=self._tls_server)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("%s on %s:%d -> %s:%d", self.name, self.host, self.port, *self.upstream)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self._conns):
            conn.abort()
        await asyncio.sleep(0)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=15)

    # -- controls (any thread) -------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rewrite(self, old: bytes, new: bytes) -> None:
        """Replace matches of the regular expression ``old`` by ``new`` in what the server sends
        (within one read)."""
        with self._lock:
            self._rewrites.append((re.compile(old), new))

    def refuse(self, refusing: bool = True) -> None:
        """While refusing, new connections are accepted and dropped at once."""
        self._refusing = refusing

    def cut_all(self) -> None:
        """Drop every open connection now."""
        assert self._loop is not None
        for conn in list(self._conns):
            self._loop.call_soon_threadsafe(conn.abort)

    def fired(self, rule_name: str | None = None) -> int:
        with self._lock:
            return sum(1 for name, _ in self.events if rule_name in (None, name))

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    # -- forwarding (event loop) -----------------------------------------------------------------

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._numbers), [cwriter])
        self.connections += 1
        if self._refusing:
            conn.abort()
            return
        host, port = self.upstream
        try:
            sreader, swriter = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=self._tls_upstream,
                    server_hostname=host if self._tls_upstream else None,
                ),
                10,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            logger.debug("%s: upstream unreachable: %s", self.name, exc)
            conn.abort()
            return
        conn.writers.append(swriter)
        self._conns.add(conn)
        try:
            await asyncio.gather(
                self._pump(conn, "c2s", creader, swriter, cwriter),
                self._pump(conn, "s2c", sreader, cwriter, swriter),
            )
        finally:
            self._conns.discard(conn)
            conn.abort()

    async def _pump(
        self,
        conn: _Conn,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        back: asyncio.StreamWriter,
    ) -> None:
        try:
            while not conn.closed:
                data = await reader.read(65536)
                if not data:
                    break
                forward, reply, close = self._process(conn, direction, data)
                if forward:
                    writer.write(forward)
                    await writer.drain()
                if reply:
                    back.write(reply)
                    await back.drain()
                if close:
                    await asyncio.sleep(0.02)  # let what was let through reach the peer
                    break
        except (OSError, ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.abort()

    def _process(self, conn: _Conn, direction: Direction, data: bytes) -> tuple[bytes, bytes, bool]:
        """What to forward, what to answer the sender, and whether to drop the connection."""
        if conn.stalled:
            return b"", b"", False
        budget = conn.budget[direction]
        if budget is not None:
            if len(data) >= budget:
                return data[:budget], b"", True
            conn.budget[direction] = budget - len(data)
            return data, b"", False
        with self._lock:
            if direction == "s2c":
                for pattern, new in self._rewrites:
                    data, count = pattern.subn(new, data)
                    self.rewritten += count
            window = conn.window[direction] + data
            offset = len(window) - len(data)
            self._notify(conn, direction, window, offset)
            for rule in self._rules:
                if rule.exhausted or rule.direction != direction or rule.action == "notify":
                    continue
                match = next((m for m in rule.pattern.finditer(window) if m.end() > offset), None)
                if match is None:
                    continue
                rule.fired += 1
                self.events.append((rule.name, conn.number))
                conn.window[direction] = b""
                logger.info("%s: %s (connection %d)", self.name, rule.name, conn.number)
                return self._act(rule, conn, direction, data, match, offset)
            conn.window[direction] = window[-_WINDOW:]
        return data, b"", False

    def _notify(self, conn: _Conn, direction: Direction, window: bytes, offset: int) -> None:
        for rule in self._rules:
            if rule.action != "notify" or rule.direction != direction:
                continue
            for match in rule.pattern.finditer(window):
                if match.end() > offset and not rule.exhausted:
                    rule.fired += 1
                    self.events.append((rule.name, conn.number))
                    if rule.callback is not None:
                        rule.callback(match)

    @staticmethod
    def _act(
        rule: Rule,
        conn: _Conn,
        direction: Direction,
        data: bytes,
        match: re.Match[bytes],
        offset: int,
    ) -> tuple[bytes, bytes, bool]:
        start = max(match.start() - offset, 0)
        end = max(match.end() - offset, 0)
        if rule.action == "cut":
            if rule.cut == direction:
                allowed = end + rule.after
                if len(data) >= allowed:
                    return data[:allowed], b"", True
                conn.budget[direction] = allowed - len(data)
                return data, b"", False
            conn.budget[_OTHER[direction]] = rule.after
            return data, b"", False
        if rule.action == "reply":
            groups = {k: v.decode() for k, v in match.groupdict().items() if v is not None}
            reply = rule.reply.decode().format(**groups).encode()
            return data[:start], reply, rule.close
        if rule.action == "stall":
            conn.stalled = True
            return data[:start], b"", False
        return data[:start], b"", True  # drop


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def client_context(ca_path: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_path)
