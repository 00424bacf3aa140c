"""``python -m mail2blob consent``: the consent on the user's own machine.

Default: a one-shot HTTP listener on ``http://localhost:<port>/`` (the redirect URI), a browser
opened on ``http://localhost:<port>/start`` (which redirects to Microsoft's sign-in, so the
``state`` never shows in the terminal), the same ``mail2blob.consent`` flow as the Function App
(kept in memory), and the listener stops after Microsoft's answer or the timeout.

``--device-code``: for machines without any browser. A public client flow: the app registration
needs "Allow public client flows" and the settings no client secret or federated credential.
"""

from __future__ import annotations

import argparse
import http.server
import logging
import os
import sys
import threading
import time
import webbrowser
from typing import Any
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_PORT = 3017
DEFAULT_TIMEOUT_S = 300.0
_CALLBACK_KEYS = frozenset({"code", "state", "error"})


def add_consent_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "consent",
        help="sign in once; the token is checked against the mailbox and stored",
        description="Sign in with the mailbox's account (or one with Full Access to it). The "
        "token is proven with an IMAP login to the mailbox before it is stored in the token "
        "store (Key Vault).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port of the local listener; the redirect URI http://localhost:<port>/ must be "
        f"registered on the app registration (default {DEFAULT_PORT}; 0 picks a free port)",
    )
    parser.add_argument(
        "--no-browser", action="store_true", help="print the sign-in address, open no browser"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"give up after this many seconds (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--device-code",
        action="store_true",
        help="sign in on another device with a code (needs 'Allow public client flows' and no "
        "client secret or federated credential configured)",
    )
    parser.set_defaults(func=cmd_consent)


def cmd_consent(args: argparse.Namespace) -> int:
    from . import cli, clients
    from .consent import Consent, MemoryFlowStore

    settings = cli._settings(args)
    consent = Consent(settings, MemoryFlowStore(), clients.token_store(settings))
    if args.device_code:
        return _device_code(consent, args.timeout)
    return _browser_flow(consent, args.port, open_browser=not args.no_browser, timeout=args.timeout)


# ---------------------------------------------------------------------------- browser flow


class _Listener(http.server.HTTPServer):
    """Serves ``/start`` (redirect to the sign-in) and ``/`` (Microsoft's answer)."""

    def __init__(self, consent: Any, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.consent = consent
        self.port = self.server_address[1]
        self.redirect_uri = f"http://localhost:{self.port}/"
        self.start_url = f"http://localhost:{self.port}/start"
        self.started: Any = None
        self.result: Any = None
        self.timeout = 0.2  # handle_request() returns this often to check the deadline


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Listener
    timeout = 15

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/start":
            self._start()
        elif parts.path == "/":
            self._answer(dict(parse_qsl(parts.query, keep_blank_values=True)))
        else:
            self._send(404, "")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 64 * 1024)) if length else b""
        if urlsplit(self.path).path != "/":
            self._send(404, "")
            return
        self._answer(dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)))

    def _start(self) -> None:
        from .consent_pages import render_problem

        if self.server.result is not None or self.server.started is None:
            self._send(410, render_problem("Finished", "This sign-in is over."))
            return
        self._send(302, "", {"Location": self.server.started.auth_uri})

    def _answer(self, params: dict[str, str]) -> None:
        from .consent_pages import CLI_RESTART, render_result, render_waiting

        if not _CALLBACK_KEYS & params.keys() or self.server.started is None:
            self._send(400, render_waiting())
            return
        result = self.server.consent.finish(self.server.started.flow_id, params)
        self._send(result.status, render_result(result, restart=CLI_RESTART))
        if result.outcome.consumed:
            self.server.result = result

    def _send(self, status: int, page: str, extra: dict[str, str] | None = None) -> None:
        from .consent_pages import CONTENT_TYPE, SECURITY_HEADERS

        body = page.encode("utf-8")
        self.send_response(status)
        for name, value in (SECURITY_HEADERS | (extra or {})).items():
            self.send_header(name, value)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The default logs the request line, whose query may hold the code and state.
        logger.debug("listener: %s %s", self.command, urlsplit(self.path).path)


def _can_open_browser() -> bool:
    """Whether a graphical browser is plausible (not over SSH without a display: there
    ``webbrowser`` would start a text browser in the terminal)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def _browser_flow(consent: Any, port: int, *, open_browser: bool, timeout: float) -> int:
    from .cli import EXIT_FAILED, EXIT_OK, EXIT_SETTINGS

    try:
        listener = _Listener(consent, port)
    except OSError as exc:
        print(
            f"cannot listen on localhost port {port}: {exc.strerror}; use --port", file=sys.stderr
        )
        return EXIT_SETTINGS
    try:
        listener.started = consent.start(listener.redirect_uri)
        print(f"Sign in to consent for {consent.settings.mailbox}:", flush=True)
        print(f"  {listener.start_url}", flush=True)
        print(
            f"(redirect URI {listener.redirect_uri} must be registered on the app registration; "
            f"waiting up to {timeout:g} s)",
            flush=True,
        )
        if open_browser and _can_open_browser():
            threading.Thread(
                target=webbrowser.open, args=(listener.start_url,), daemon=True
            ).start()
        deadline = time.monotonic() + timeout
        while listener.result is None and time.monotonic() < deadline:
            listener.handle_request()
    finally:
        listener.server_close()
    result = listener.result
    if result is None:
        print(
            f"no answer from the sign-in within {timeout:g} s; nothing was stored",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return _report(result, EXIT_OK, EXIT_FAILED)


def _report(result: Any, ok: int, failed: int) -> int:
    if result.ok:
        print(
            f"Consent saved for {result.mailbox} (signed in as {result.account}). "
            f"{result.next_drain}",
            flush=True,
        )
        return ok
    print(f"consent failed: {result.summary()}", file=sys.stderr)
    return failed


# ---------------------------------------------------------------------------- device code


def _device_code(consent: Any, timeout: float) -> int:
    import msal

    from .cli import EXIT_FAILED, EXIT_OK, EXIT_SETTINGS
    from .tokens import client_credential

    if client_credential(consent.settings) is not None:
        print(
            "--device-code needs a public client: unset MAIL2BLOB_CLIENT_SECRET and "
            "MAIL2BLOB_FIC_CLIENT_ID, and set 'Allow public client flows' to Yes on the app "
            "registration (Authentication page). Or use the browser flow without --device-code.",
            file=sys.stderr,
        )
        return EXIT_SETTINGS
    cache = msal.SerializableTokenCache()
    try:
        result = _run_device_flow(consent.settings, cache, timeout)
    except OSError as exc:  # requests' connection errors and timeouts
        print(f"the identity platform could not be reached ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILED
    if result.get("error") in ("authorization_pending", "slow_down"):
        print(f"no sign-in within {timeout:g} s; nothing was stored", file=sys.stderr)
        return EXIT_FAILED
    return _report(consent.complete(result, cache), EXIT_OK, EXIT_FAILED)


def _run_device_flow(settings: Any, cache: Any, timeout: float) -> dict[str, Any]:
    """Print the code to enter, then poll until the sign-in, a refusal or ``timeout``."""
    from .settings import IMAP_SCOPE
    from .tokens import build_msal_app

    app = build_msal_app(settings, cache)  # public: no credential configured
    flow = app.initiate_device_flow(scopes=[IMAP_SCOPE])
    if "user_code" not in flow:
        return flow  # an error response: complete() explains it
    print(flow.get("message") or "", flush=True)
    flow["expires_at"] = min(float(flow["expires_at"]), time.time() + timeout)
    return app.acquire_token_by_device_flow(flow)
