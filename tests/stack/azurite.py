"""Azurite (Blob, Queue, Table) as the local stand-in for Azure Storage.

Runs the npm package from the repo's node_modules, in memory, on loopback ports that Azurite picks
itself (port 0, read back from its start-up lines) the first time and keeps across ``restart()``.
In-memory persistence means a restart loses every container, blob and queue.
"""

from __future__ import annotations

import http.client
import logging
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO_ROOT / "node_modules" / ".bin" / "azurite"
HOST = "127.0.0.1"
ACCOUNT_NAME = "devstoreaccount1"
# The well-known, public development storage key (not a secret).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
SERVICES = ("blob", "queue", "table")
START_TIMEOUT = 30.0
_OPERATION = re.compile(r"DispatchMiddleware: Operation=(\w+)")
_LISTENING = re.compile(
    r"Azurite (Blob|Queue|Table) service is successfully listening at \S+:(\d+)"
)


class Azurite:
    """One Azurite process; ``start()`` before use.

    ``debug_log``: a file for Azurite's ``--debug`` log (one entry per request and more), so a
    benchmark can count requests."""

    def __init__(self, directory: Path, *, debug_log: Path | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.debug_log = Path(debug_log) if debug_log else None
        self.host = HOST
        self._ports: dict[str, int] = {}
        self._stdout_path = self.directory / "azurite.out"
        self._process: subprocess.Popen[bytes] | None = None
        self._blob_service: BlobServiceClient | None = None

    @property
    def blob_port(self) -> int:
        return self._port("blob")

    @property
    def queue_port(self) -> int:
        return self._port("queue")

    @property
    def table_port(self) -> int:
        return self._port("table")

    def _port(self, service: str) -> int:
        if service not in self._ports:
            raise RuntimeError("Azurite has not been started yet")
        return self._ports[service]

    def endpoint(self, service: str) -> str:
        return f"http://{self.host}:{self._port(service)}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint('blob')};QueueEndpoint={self.endpoint('queue')};"
            f"TableEndpoint={self.endpoint('table')};"
        )

    def blob_service(self) -> BlobServiceClient:
        """A BlobServiceClient for this instance (one shared client per start)."""
        if self._blob_service is None:
            self._blob_service = BlobServiceClient.from_connection_string(self.connection_string)
        return self._blob_service

    def fresh_container(self, prefix: str = "t") -> str:
        """Create a container with a unique name and return the name."""
        name = f"{prefix.lower()}-{uuid.uuid4().hex[:16]}"
        self.blob_service().create_container(name)
        return name

    # -- process -------------------------------------------------------------------------

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("Azurite is already running")
        command = [
            str(AZURITE_BIN),
            "--inMemoryPersistence",
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ]
        for service in SERVICES:
            command += [f"--{service}Host", self.host, f"--{service}Port"]
            command.append(str(self._ports.get(service, 0)))
        if self.debug_log:
            command += ["--debug", str(self.debug_log)]
        started = time.monotonic()
        self._stdout_path.write_bytes(b"")
        with self._stdout_path.open("ab") as out:
            # cwd: Azurite may drop files (e.g. a legacy location) into its working directory.
            self._process = subprocess.Popen(
                command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        try:
            self._wait_until_ready()
        except Exception:
            self.stop()
            raise
        logger.info(
            "Azurite up (blob %d, queue %d, table %d) in %.2f s",
            self.blob_port,
            self.queue_port,
            self.table_port,
            time.monotonic() - started,
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"azurite exited with {self._process.returncode}:\n{self._output()}"
                )
            ports = {m[0].lower(): int(m[1]) for m in _LISTENING.findall(self._output())}
            if len(ports) == len(SERVICES) and self._blob_answers(ports["blob"]):
                self._ports = ports
                return
            time.sleep(0.05)
        raise RuntimeError(f"Azurite did not start in {START_TIMEOUT} s:\n{self._output()}")

    def _blob_answers(self, port: int) -> bool:
        """Any HTTP answer (even 403 to an unsigned request) means the blob service is up."""
        connection = http.client.HTTPConnection(self.host, port, timeout=2)
        try:
            connection.request("GET", f"/{ACCOUNT_NAME}?comp=list")
            connection.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            connection.close()

    def _output(self) -> str:
        return self._stdout_path.read_text(errors="replace")

    def stop(self) -> None:
        process, self._process = self._process, None
        if self._blob_service is not None:
            self._blob_service.close()
            self._blob_service = None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("Azurite did not stop on SIGTERM; killing it")
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start on the same ports. In-memory persistence: all data is lost."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def operations(self) -> Counter[str]:
        """Requests served so far by operation (``Container_Create``, ``BlockBlob_Upload``...),
        read from the debug log. Azurite writes that log lazily: exact only after ``stop()``.
        Each start adds one ``Service_ListContainersSegment`` (the readiness probe)."""
        if self.debug_log is None:
            raise RuntimeError("operations() needs Azurite(..., debug_log=path)")
        text = self.debug_log.read_text(errors="replace") if self.debug_log.exists() else ""
        return Counter(_OPERATION.findall(text))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A running Azurite for the whole session; isolate tests with ``fresh_container()``."""
    server = Azurite(tmp_path_factory.mktemp("azurite"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
