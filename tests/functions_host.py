"""What the Azure Functions host does around our functions, played against the local stack: index
the app, call a function's user code with real ``azure.functions`` objects, collect output
bindings, and move queue messages through Azurite's Queue service the way the host's queue
trigger does (base64 messages, ``dequeue_count``, visibility, poison).

The host itself cannot run here (see the notes); this is the closest stand-in.
"""

from __future__ import annotations

import runpy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import azure.functions as func
from azure.core.exceptions import ResourceExistsError
from azure.functions.queue import QueueMessage
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class Out(func.Out[T]):
    """An output binding as the worker passes it: the function calls ``set()``."""

    def __init__(self) -> None:
        self.value: T | None = None

    def set(self, val: T) -> None:
        self.value = val

    def get(self) -> T | None:
        return self.value


@dataclass
class Function:
    name: str
    bindings: list[dict[str, Any]]
    user_function: Callable[..., Any]

    def binding(self, kind: str) -> dict[str, Any]:
        (found,) = [b for b in self.bindings if b["type"] == kind]
        return found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.user_function(*args, **kwargs)


def load_functions() -> dict[str, Function]:
    """The functions of a freshly executed ``function_app.py`` (``get_functions()`` may be called
    only once per app object)."""
    app = runpy.run_path(str(ROOT / "function_app.py"))["app"]
    return {
        fn.get_function_name(): Function(
            fn.get_function_name(),
            [b.get_dict_repr() for b in fn.get_bindings()],
            fn.get_user_function(),
        )
        for fn in app.get_functions()
    }


class QueueHost:
    """One Azurite queue driven like the host's queue trigger: messages are base64 text (host.json
    ``messageEncoding``), a received message becomes invisible, a failed invocation makes it
    visible again (after ``visibilityTimeout``, here at once) and its ``dequeue_count`` grows."""

    def __init__(self, connection_string: str, name: str) -> None:
        self.client = QueueClient.from_connection_string(
            connection_string,
            name,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )
        self.name = name
        try:
            self.client.create_queue()
        except ResourceExistsError:
            self.client.clear_messages()

    def send(self, bodies: list[str] | str | None) -> None:
        """What an output binding does with what the function ``set()``."""
        if bodies is None:
            return
        for body in [bodies] if isinstance(bodies, str) else bodies:
            self.client.send_message(body)

    def receive(self, visibility_timeout: int = 60) -> Iterator[tuple[Any, QueueMessage]]:
        """Visible messages, each as the storage message and the ``azure.functions`` one."""
        for message in self.client.receive_messages(visibility_timeout=visibility_timeout):
            yield (
                message,
                QueueMessage(
                    id=message.id,
                    body=message.content.encode("utf-8"),
                    dequeue_count=message.dequeue_count,
                    insertion_time=message.inserted_on,
                    expiration_time=message.expires_on,
                    pop_receipt=message.pop_receipt,
                ),
            )

    def complete(self, message: Any) -> None:
        """The invocation succeeded: the host deletes the message."""
        self.client.delete_message(message)

    def fail(self, message: Any) -> None:
        """The invocation raised: visible again for the next attempt."""
        self.client.update_message(message, visibility_timeout=0)

    def peek_all(self) -> list[str]:
        return [m.content for m in self.client.peek_messages(max_messages=32)]

    def invoke_all(
        self, function: Function, outputs: Callable[[], dict[str, Out[Any]]]
    ) -> list[tuple[QueueMessage, dict[str, Out[Any]], BaseException | None]]:
        """Deliver every visible message once to ``function`` (the queue trigger's user code),
        completing or failing each as the host would. Returns what happened per message."""
        happened = []
        for stored, message in list(self.receive()):
            out = outputs()
            try:
                function(message, **out)
            except Exception as exc:  # noqa: BLE001 - the host records it and retries
                self.fail(stored)
                happened.append((message, out, exc))
                continue
            self.complete(stored)
            happened.append((message, out, None))
        return happened
