"""The Function App as the Azure Functions Python worker indexes it (``azure-functions-runtime``,
driven by ``tests/worker_shim.py``): every function ``get_functions()`` declares must load, with
the bindings the worker computes. The worker's checks are stricter than ``get_functions()``; an
app they refuse starts in Azure with "0 functions loaded". Small broken apps prove the check fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.worker_shim import INSTALL_LINE, MISSING_RUNTIME_EXIT, missing_runtime_message

ROOT = Path(__file__).resolve().parents[1]
SHIM_TIMEOUT_S = 60
# (the worker's result, the SDK's functions: name -> binding name -> {"type", "direction"})
Indexing = tuple[dict[str, Any], dict[str, Any]]

# The functions of function_app.py, binding name -> (type, direction), as the worker reports them.
EXPECTED_BINDINGS = {
    "drain_timer": {"timer": ("timerTrigger", "in"), "drains": ("queue", "out")},
    "drain_queue": {"msg": ("queueTrigger", "in"), "poison": ("queue", "out")},
    "status": {"req": ("httpTrigger", "in"), "$return": ("http", "out")},
    "consent_start": {"req": ("httpTrigger", "in"), "$return": ("http", "out")},
    "consent_callback": {"req": ("httpTrigger", "in"), "$return": ("http", "out")},
}
# Parameter -> (binding the worker converts it with, Python type), for the non-HTTP functions.
EXPECTED_PARAMS = {
    "drain_timer": {
        "inputs": {"timer": ("timerTrigger", "TimerRequest")},
        "outputs": {"drains": ("queue", "typing.List[str]")},
    },
    "drain_queue": {
        "inputs": {"msg": ("queueTrigger", "QueueMessage")},
        "outputs": {"poison": ("generic", "str")},
    },
}

# A small app the worker loads; each broken variant changes one thing in it.
GOOD_APP = """\
from typing import List

import azure.functions as func

app = func.FunctionApp()


@app.timer_trigger(arg_name="timer", schedule="0 */5 * * * *")
@app.queue_output(arg_name="drains", queue_name="q", connection="AzureWebJobsStorage")
def tick(timer: func.TimerRequest, drains: func.Out[List[str]]) -> None:
    pass


@app.route(route="status", auth_level=func.AuthLevel.FUNCTION)
def status(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("ok")
"""
BROKEN_APPS = {
    # (text in GOOD_APP, its replacement, what the worker's refusal says)
    "parameter name differs from arg_name": (
        "def status(req: func.HttpRequest)",
        "def status(request: func.HttpRequest)",
        "cannot load the status function: the following parameters are declared in Python but "
        "not in the function definition (function.json or function decorators):  {'request'}",
    ),
    "Out of a builtin generic": (
        "drains: func.Out[List[str]]",
        "drains: func.Out[list[str]]",
        "cannot load the tick function: binding drains has invalid non-type annotation",
    ),
    "output binding not annotated Out": (
        "drains: func.Out[List[str]]",
        "drains: str",
        'cannot load the tick function: binding drains is declared to have the "out" direction',
    ),
    "input binding annotated Out": (
        "timer: func.TimerRequest",
        "timer: func.Out[str]",
        'cannot load the tick function: binding timer is declared to have the "in" direction',
    ),
    "binding without a parameter": (
        "timer: func.TimerRequest, drains: func.Out[List[str]]",
        "timer: func.TimerRequest",
        "cannot load the tick function: Extra parameters in binding definition",
    ),
}


def _fail_missing_runtime(message: str) -> NoReturn:
    """Fail, never skip: CI installs the runtime (Makefile), so its absence is a broken setup."""
    pytest.fail(f"{message}  (`make deps` runs it)", pytrace=False)


def _start_shim(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.worker_shim", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON a shim process printed; fails the test (never skips) when the runtime is missing."""
    try:
        stdout, stderr = proc.communicate(timeout=SHIM_TIMEOUT_S)
    finally:
        _stop(proc)
    if proc.returncode == MISSING_RUNTIME_EXIT:
        _fail_missing_runtime(stderr.strip())
    assert proc.returncode in (0, 1) and stdout.strip(), (
        f"{' '.join(map(str, proc.args))} crashed ({proc.returncode}):\n{stderr}"
    )
    return json.loads(stdout)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def index_apps(app_dirs: dict[str, Path]) -> dict[str, Indexing]:
    """Each app as the worker indexes it and as the SDK's ``get_functions()`` declares it:
    ``{key: (worker result, {function: {binding: {"type", "direction"}}})}``.

    Fresh processes, side by side: one worker per app (the runtime keeps module state) and one
    for the SDK's view of all of them. A failure leaves no process running."""
    if importlib.util.find_spec("azure_functions_runtime") is None:
        _fail_missing_runtime(missing_runtime_message("no module named azure_functions_runtime"))
    started: list[subprocess.Popen[str]] = []
    try:
        started.append(_start_shim("--sdk", *map(str, app_dirs.values())))
        workers = {}
        for key, app_dir in app_dirs.items():
            workers[key] = _start_shim(str(app_dir))
            started.append(workers[key])
        declared = _result(started[0])
        return {key: (_result(workers[key]), declared[str(d)]) for key, d in app_dirs.items()}
    finally:
        for proc in started:
            _stop(proc)


def _bindings(function: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {name: (b["type"], b["direction"]) for name, b in function["bindings"].items()}


def _broken(case: str) -> str:
    old, new, _ = BROKEN_APPS[case]
    assert old in GOOD_APP, f"the {case!r} variant no longer matches GOOD_APP"
    return GOOD_APP.replace(old, new)


@pytest.fixture(scope="module")
def indexings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Indexing]:
    """Every app of this module indexed up front: ``"function_app"`` (the project's),
    ``"sample"`` (GOOD_APP) and each BROKEN_APPS case."""
    app_dirs = {"function_app": ROOT}
    sources = {"sample": GOOD_APP} | {case: _broken(case) for case in BROKEN_APPS}
    for case, source in sources.items():
        app_dirs[case] = tmp_path_factory.mktemp("app")
        (app_dirs[case] / "function_app.py").write_text(source)
    return index_apps(app_dirs)


@pytest.fixture(scope="module")
def indexed(indexings: dict[str, Indexing]) -> Indexing:
    return indexings["function_app"]


def test_worker_loads_every_function_the_app_declares(indexed: Indexing) -> None:
    worker, declared = indexed
    assert worker["status"] == "Success", worker["exception"]
    names = [f["name"] for f in worker["functions"]]
    assert declared, "function_app.app.get_functions() declared no function"
    assert sorted(names) == sorted(declared), "the worker loaded other functions than declared"
    assert len({f["function_id"] for f in worker["functions"]}) == len(names)
    for function in worker["functions"]:
        declared_bindings = {
            name: (b["type"], b["direction"]) for name, b in declared[function["name"]].items()
        }
        assert _bindings(function) == declared_bindings, function["name"]


def test_worker_metadata_is_what_the_host_needs(indexed: Indexing) -> None:
    worker, _ = indexed
    for function in worker["functions"]:
        name = function["name"]
        assert function["script_file"] == "function_app.py", name
        assert function["directory"] == str(ROOT), name
        assert function["entry_point"] == name
        assert function["language"] == "python"
        assert function["properties"] == {"worker_indexed": "True"}
        assert sorted(b["name"] for b in function["raw_bindings"]) == sorted(function["bindings"])
        triggers = [b for b in function["bindings"].values() if b["type"].endswith("Trigger")]
        assert len(triggers) == 1 and triggers[0]["direction"] == "in", name
        assert not function["is_async"] and not function["requires_context"], name


def test_worker_computes_the_expected_bindings(indexed: Indexing) -> None:
    worker, _ = indexed
    functions = {f["name"]: f for f in worker["functions"]}
    missing = EXPECTED_BINDINGS.keys() - functions.keys()
    assert not missing, f"function_app.py no longer has {sorted(missing)}"
    for name, expected in EXPECTED_BINDINGS.items():
        assert _bindings(functions[name]) == expected, name
        http = "$return" in expected
        assert functions[name]["is_http_func"] is http, name
        assert functions[name]["return_binding"] == ("http" if http else None), name
    for name, expected in EXPECTED_PARAMS.items():
        for side in ("inputs", "outputs"):
            got = {p: (t["binding"], t["pytype"]) for p, t in functions[name][side].items()}
            assert got == expected[side], (name, side)


def test_worker_loads_the_unbroken_sample_app(indexings: dict[str, Indexing]) -> None:
    worker, declared = indexings["sample"]
    assert worker["status"] == "Success", worker["exception"]
    assert sorted(f["name"] for f in worker["functions"]) == sorted(declared) == ["status", "tick"]


@pytest.mark.parametrize("case", BROKEN_APPS)
def test_worker_refuses_an_app_get_functions_accepts(
    case: str, indexings: dict[str, Indexing]
) -> None:
    worker, declared = indexings[case]
    assert sorted(declared) == ["status", "tick"], "get_functions() itself refused the app"
    assert worker["status"] == "Failure", f"the worker loaded an app with {case}"
    assert worker["functions"] == []
    assert worker["exception"].startswith("FunctionLoadError: "), worker["exception"]
    assert BROKEN_APPS[case][2] in worker["exception"]


def test_missing_runtime_fails_with_the_install_line(tmp_path: Path) -> None:
    """Without the runtime the test fails (never skips) and says how to install it."""
    fake = tmp_path / "azure_functions_runtime"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with pytest.raises(pytest.fail.Exception, match="simulated: not installed") as failed:
        _result(_start_shim(str(ROOT), env=env))
    assert INSTALL_LINE in str(failed.value)
