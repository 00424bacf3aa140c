"""The Azurite stand-in answers the Blob and Queue calls mail2blob makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import ContentSettings
from azure.storage.queue import QueueClient

from tests.stack.azurite import Azurite


def test_connection_string_names_every_endpoint(azurite: Azurite) -> None:
    parts = dict(p.split("=", 1) for p in azurite.connection_string.rstrip(";").split(";"))
    assert parts["AccountName"] == "devstoreaccount1"
    assert parts["BlobEndpoint"] == f"http://127.0.0.1:{azurite.blob_port}/devstoreaccount1"
    assert parts["QueueEndpoint"] == f"http://127.0.0.1:{azurite.queue_port}/devstoreaccount1"
    assert parts["TableEndpoint"] == f"http://127.0.0.1:{azurite.table_port}/devstoreaccount1"
    assert len({azurite.blob_port, azurite.queue_port, azurite.table_port}) == 3


def test_blob_round_trip_with_metadata_and_no_overwrite(azurite: Azurite) -> None:
    container = azurite.blob_service().get_container_client(azurite.fresh_container())
    body = os.urandom(100_000) + b"\r\n\x00\xff"
    metadata = {"uidvalidity": "1795708844", "uid": "42", "folder": "Archive%2F2024"}

    container.upload_blob(
        "mbox/INBOX/42.eml",
        body,
        metadata=metadata,
        overwrite=False,
        content_settings=ContentSettings(content_type="message/rfc822"),
    )
    with pytest.raises(ResourceExistsError):
        container.upload_blob("mbox/INBOX/42.eml", b"other", overwrite=False)

    blob = container.get_blob_client("mbox/INBOX/42.eml")
    assert blob.download_blob().readall() == body
    properties = blob.get_blob_properties()
    assert properties.metadata == metadata
    assert properties.content_settings.content_type == "message/rfc822"
    assert properties.size == len(body)
    assert [b.name for b in container.list_blobs(name_starts_with="mbox/")] == ["mbox/INBOX/42.eml"]


def test_fresh_containers_are_distinct(azurite: Azurite) -> None:
    first, second = azurite.fresh_container("run"), azurite.fresh_container("run")
    assert first != second
    assert first.startswith("run-")
    names = {c.name for c in azurite.blob_service().list_containers(name_starts_with="run-")}
    assert {first, second} <= names


def test_queue_send_and_receive(azurite: Azurite) -> None:
    queue = QueueClient.from_connection_string(azurite.connection_string, "mailbox-jobs")
    queue.create_queue()
    try:
        queue.send_message('{"mailbox": "archive@contoso.example"}')
        messages = list(queue.receive_messages(max_messages=5, visibility_timeout=30))
        assert [m.content for m in messages] == ['{"mailbox": "archive@contoso.example"}']
        queue.delete_message(messages[0])
        assert list(queue.receive_messages()) == []
    finally:
        queue.delete_queue()


def test_restart_keeps_ports_and_loses_data(tmp_path: Path) -> None:
    """A private instance: restarting the session one would lose other tests' containers."""
    debug_log = tmp_path / "debug.log"
    server = Azurite(tmp_path / "azurite", debug_log=debug_log)
    server.start()
    try:
        container = server.fresh_container()
        ports = (server.blob_port, server.queue_port, server.table_port)

        server.restart()

        assert (server.blob_port, server.queue_port, server.table_port) == ports
        with pytest.raises(ResourceNotFoundError):
            server.blob_service().get_container_client(container).get_container_properties()
    finally:
        server.stop()
    assert not server.running
    operations = server.operations()  # after stop(): Azurite writes its debug log lazily
    assert operations["Container_Create"] == 1
    assert operations["Container_GetProperties"] == 1
    assert operations["Service_ListContainersSegment"] == 2  # one readiness probe per start
