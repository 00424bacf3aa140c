"""Index a v2-model Function App the way the Azure Functions Python worker does, without the host.

The host cannot run here (see the notes). The worker's own library, ``azure-functions-runtime``
(PyPI; it declares Python >= 3.13 but is pure Python), does the indexing: the proxy worker passes
it a ``WorkerInitRequest`` plus its generated gRPC ``protos`` module, and it imports
``function_app.py``, calls ``app.get_functions()`` and checks every function against its signature
(``Registry.add_indexed_function``). That check refuses apps ``get_functions()`` accepts (a
parameter whose name differs from the binding's ``arg_name``, an ``Out[list[str]]`` annotation...);
in Azure the host then reports "0 functions loaded".

This module plays the proxy worker: ``protos`` below stands in for the generated gRPC module (the
message fields come from ``FunctionRpc.proto``; unknown fields and wrongly typed values raise, as
protobuf does), and ``index_app`` sends the init and metadata requests. Run it in a fresh process
(``python -m tests.worker_shim APP_DIR``): the runtime keeps module-level state and
``get_functions()`` may be called only once per app object. It prints one JSON document;
``--sdk APP_DIR...`` prints what ``get_functions()`` alone declares instead, for comparison.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import runpy
import sys
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

INSTALL_LINE = (
    ".venv/bin/python -m pip install --no-deps --ignore-requires-python "
    "azure-functions-runtime==1.3.0"
)
MISSING_RUNTIME_EXIT = 3


def missing_runtime_message(detail: str) -> str:
    return (
        f"azure-functions-runtime (the Python worker's indexing) cannot be imported in "
        f"{sys.prefix} ({detail}). Install it with: {INSTALL_LINE}"
    )


class _Message:
    """A protobuf message stand-in: keyword construction, defaults for unset fields, and the
    errors protobuf raises for an unknown field or a value of the wrong type."""

    FIELDS: ClassVar[dict[str, tuple[type, ...]]] = {}

    def __init__(self, **values: Any) -> None:
        name = type(self).__name__
        for field in values.keys() - self.FIELDS.keys():
            raise ValueError(f'Protocol message {name} has no "{field}" field.')
        for field, kinds in self.FIELDS.items():
            value = values.get(field)
            if value is None:  # protobuf treats None as "not set"
                value = kinds[0]() if kinds[0] in (str, int, bool, dict, list) else None
            elif not isinstance(value, kinds):
                raise TypeError(f"{name}.{field}: {value!r} is not {kinds}")
            setattr(self, field, value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({fields})"


def _message(name: str, fields: dict[str, Any], **enums: int) -> type[_Message]:
    """A message class; ``enums`` become class attributes as in generated code
    (``BindingInfo.out``); a field's kinds may be a type or a tuple of types."""
    spec = {f: k if isinstance(k, tuple) else (k,) for f, k in fields.items()}
    return type(name, (_Message,), {"FIELDS": spec, **enums})


_ENUM = (int, str)  # protobuf accepts an enum value's number or name
DIRECTIONS = {"in": 0, "out": 1, "inout": 2}
DATA_TYPES = {"undefined": 0, "string": 1, "binary": 2, "stream": 3}
_STATUSES = {"Failure": 0, "Success": 1, "Cancelled": 2}

BindingInfo = _message(
    "BindingInfo",
    {"type": str, "direction": int, "data_type": int, "properties": dict},
    **DIRECTIONS,
    **DATA_TYPES,
)
RpcException = _message(
    "RpcException",
    {"source": str, "stack_trace": str, "message": str, "is_user_exception": bool, "type": str},
)
StatusResult = _message(
    "StatusResult",
    {"status": int, "result": str, "exception": RpcException, "logs": list},
    **_STATUSES,
)
RpcRetryOptions = _message(
    "RpcRetryOptions",
    {
        "max_retry_count": int,
        "delay_interval": timedelta,
        "minimum_interval": timedelta,
        "maximum_interval": timedelta,
        "retry_strategy": _ENUM,
    },
)
RpcFunctionMetadata = _message(
    "RpcFunctionMetadata",
    {
        "name": str,
        "directory": str,
        "script_file": str,
        "entry_point": str,
        "bindings": dict,
        "is_proxy": bool,
        "status": StatusResult,
        "language": str,
        "raw_bindings": list,
        "function_id": str,
        "managed_dependency_enabled": bool,
        "retry_options": RpcRetryOptions,
        "properties": dict,
    },
)
WorkerMetadata = _message(
    "WorkerMetadata",
    {
        "runtime_name": str,
        "runtime_version": str,
        "worker_version": str,
        "worker_bitness": str,
        "custom_properties": dict,
    },
)
WorkerInitRequest = _message(
    "WorkerInitRequest",
    {
        "host_version": str,
        "capabilities": dict,
        "log_categories": dict,
        "worker_directory": str,
        "function_app_directory": str,
    },
)
WorkerInitResponse = _message(
    "WorkerInitResponse",
    {
        "worker_version": str,
        "capabilities": dict,
        "result": StatusResult,
        "worker_metadata": WorkerMetadata,
    },
)
FunctionMetadataResponse = _message(
    "FunctionMetadataResponse",
    {
        "function_metadata_results": list,
        "result": StatusResult,
        "use_default_metadata_indexing": bool,
    },
)
FunctionsMetadataRequest = _message("FunctionsMetadataRequest", {"function_app_directory": str})
StreamingMessage = _message(
    "StreamingMessage",
    {
        "request_id": str,
        "worker_init_request": WorkerInitRequest,
        "functions_metadata_request": FunctionsMetadataRequest,
    },
)

protos = types.SimpleNamespace(
    **{
        cls.__name__: cls
        for cls in (
            BindingInfo,
            RpcException,
            StatusResult,
            RpcRetryOptions,
            RpcFunctionMetadata,
            WorkerMetadata,
            WorkerInitRequest,
            WorkerInitResponse,
            FunctionMetadataResponse,
            FunctionsMetadataRequest,
            StreamingMessage,
        )
    }
)


@dataclass
class WorkerRequest:
    """What the proxy worker hands the library worker (``proxy_worker/dispatcher.py``)."""

    name: str
    request: Any
    properties: dict[str, Any] | None = None


def _name_of(value: int, names: dict[str, int]) -> str:
    return next((n for n, v in names.items() if v == value), str(value))


def _type_name(pytype: Any) -> str:
    """``str``, ``TimerRequest``; generics as written (``typing.List[str]``)."""
    return pytype.__name__ if isinstance(pytype, type) else repr(pytype)


def _describe_function(meta: Any, info: Any) -> dict[str, Any]:
    """The metadata the host would receive for one function, plus what the worker's registry
    (``handle_event._functions``) computed from its signature: the binding each parameter is
    converted with."""

    def params(types_: dict[str, Any]) -> dict[str, dict[str, str]]:
        return {
            p: {"binding": t.binding_name, "pytype": _type_name(t.pytype)}
            for p, t in types_.items()
        }

    return_type = info.return_type
    return {
        "name": meta.name,
        "function_id": meta.function_id,
        "directory": meta.directory,
        "script_file": meta.script_file,
        "entry_point": meta.entry_point,
        "language": meta.language,
        "properties": meta.properties,
        "bindings": {
            name: {
                "type": b.type,
                "direction": _name_of(b.direction, DIRECTIONS),
                "data_type": _name_of(b.data_type, DATA_TYPES),
            }
            for name, b in meta.bindings.items()
        },
        "raw_bindings": [json.loads(raw) for raw in meta.raw_bindings],
        "inputs": params(info.input_types),
        "outputs": params(info.output_types),
        "return_binding": return_type.binding_name if return_type else None,
        "is_http_func": info.is_http_func,
        "is_async": info.is_async,
        "requires_context": info.requires_context,
    }


async def _index(app_dir: str) -> dict[str, Any]:
    import azure_functions_runtime as worker
    from azure_functions_runtime import handle_event

    logger.debug("indexing %s as the worker does", app_dir)
    init = StreamingMessage(worker_init_request=WorkerInitRequest(function_app_directory=app_dir))
    response = await worker.worker_init_request(
        WorkerRequest("WorkerInitRequest", init, {"protos": protos, "host": "127.0.0.1"})
    )
    result: dict[str, Any] = {
        "status": _name_of(response.result.status, _STATUSES),
        "exception": response.result.exception.message if response.result.exception else None,
        "functions": [],
    }
    if result["status"] != "Success":
        return result
    ask = StreamingMessage(
        functions_metadata_request=FunctionsMetadataRequest(function_app_directory=app_dir)
    )
    metadata = await worker.functions_metadata_request(WorkerRequest("WorkerMetadataRequest", ask))
    result["functions"] = [
        _describe_function(meta, handle_event._functions.get_function(meta.function_id))
        for meta in metadata.function_metadata_results or []
    ]
    return result


def _enter(app_dir: str) -> str:
    """Put the app directory first on ``sys.path`` and make it the working directory, as in
    Azure (``/home/site/wwwroot``)."""
    app_dir = os.path.abspath(app_dir)
    sys.path.insert(0, app_dir)
    os.chdir(app_dir)
    return app_dir


def index_app(app_dir: str) -> dict[str, Any]:
    """Index the ``function_app.py`` in ``app_dir`` in this process, as the worker does at init:
    ``{"status", "exception", "functions": [...]}``. Call once per process."""
    return asyncio.run(_index(_enter(app_dir)))


def declared_functions(app_dirs: list[str]) -> dict[str, Any]:
    """What the SDK alone says (``function_app.app.get_functions()``, none of the worker's checks)
    for each app: ``{app_dir: {function name: {binding name: {"type", "direction"}}}}``.

    Each ``function_app.py`` is executed afresh (a new app object, so ``get_functions()`` runs
    once per app) with its directory first on ``sys.path``."""
    declared = {}
    for app_dir in app_dirs:
        path = os.path.abspath(app_dir)
        sys.path.insert(0, path)
        try:
            app = runpy.run_path(os.path.join(path, "function_app.py"), run_name="function_app")
        finally:
            sys.path.remove(path)
        declared[app_dir] = {
            fn.get_function_name(): {
                b.name: {"type": b.type, "direction": _name_of(b.direction, DIRECTIONS)}
                for b in fn.get_bindings()
            }
            for fn in app["app"].get_functions()
        }
    return declared


def main(argv: list[str]) -> int:
    """``APP_DIR``: print the worker's indexing as JSON; exit 0 when the worker loaded the app,
    1 when it refused it, 3 without the runtime. ``--sdk APP_DIR...``: ``declared_functions``."""
    if argv[:1] == ["--sdk"] and len(argv) > 1:
        print(json.dumps(declared_functions(argv[1:]), indent=1, sort_keys=True))
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m tests.worker_shim APP_DIR | --sdk APP_DIR...", file=sys.stderr)
        return 2
    try:
        import azure_functions_runtime  # noqa: F401
    except ImportError as exc:
        print(missing_runtime_message(str(exc)), file=sys.stderr)
        return MISSING_RUNTIME_EXIT
    result = index_app(argv[0])
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0 if result["status"] == "Success" else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(main(sys.argv[1:]))
