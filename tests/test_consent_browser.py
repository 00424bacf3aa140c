"""The consent link in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright) follows the redirect to the identity stand-in's sign-in page, picks an account, and
Microsoft's ``form_post`` page POSTs the answer cross-site to the callback.

The consent functions are served by a small HTTPS adapter (requests in, ``func.HttpRequest`` to
the user functions, ``func.HttpResponse`` out) on ``https://localhost:<port>``, while the identity
stand-in is ``https://127.0.0.1:<port>``: two different sites, as in production, so the cookie's
SameSite attribute matters here exactly as it does with login.microsoftonline.com.
"""

from __future__ import annotations

import http.server
import runpy
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
import pytest

from tests.stack import constants as c
from tests.test_consent import consent_env

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME = "mail2blob-token-cache"
FUNCTION_KEY = "browser-test-function-key"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)"
)


# ---------------------------------------------------------------------------- the app server


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _AppServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        route = {
            ("GET", "/api/consent"): "consent_start",
            ("GET", "/api/consent/callback"): "consent_callback",
            ("POST", "/api/consent/callback"): "consent_callback",
        }.get((self.command, parts.path))
        if route is None:
            self._reply(404, {}, b"not found")
            return
        # What the Functions host does for auth level FUNCTION.
        if route == "consent_start" and params.pop("code", None) != FUNCTION_KEY:
            self._reply(401, {}, b"")
            return
        request = func.HttpRequest(
            self.command,
            f"https://{self.headers['Host']}{self.path}",
            headers=dict(self.headers.items()),
            params=params,
            body=body,
        )
        response = self.server.functions[route].get_user_function()(request)
        headers = dict(response.headers.items())
        headers.setdefault("Content-Type", f"{response.mimetype}; charset={response.charset}")
        self._reply(response.status_code, headers, response.get_body())

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _AppServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, functions: dict[str, Any], context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.functions = functions
        self.context = context

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), address


@pytest.fixture(scope="module")
def app_server(test_ca) -> Iterator[_AppServer]:
    app = runpy.run_path(str(ROOT / "function_app.py"))["app"]
    functions = {f.get_function_name(): f for f in app.get_functions()}
    cert, key = test_ca.issue("consent-app", ("localhost",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _AppServer(functions, context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


class Site:
    """One test's browser context at the consent app, plus what the page reported."""

    def __init__(self, browser: Any, base: str) -> None:
        # The test CA is not in Chromium's store; certificate checks are not under test here.
        self.context = browser.new_context(ignore_https_errors=True)
        self.context.set_default_timeout(10_000)
        self.page = self.context.new_page()
        self.base = base
        self.console: list[str] = []
        self.callback_posts: list[str] = []
        self.page.on("console", lambda message: self.console.append(message.text))
        self.page.on("request", self._record)

    def _record(self, request: Any) -> None:
        if request.method == "POST" and urlsplit(request.url).path == "/api/consent/callback":
            self.callback_posts.append(request.post_data or "")

    @property
    def callback_url(self) -> str:
        return f"{self.base}/api/consent/callback"

    def open_consent(self) -> None:
        self.page.goto(f"{self.base}/api/consent?code={FUNCTION_KEY}")
        self.page.wait_for_selector("form#signin")

    def sign_in(self, user: str) -> None:
        self.page.check(f'input[name=user][value="{user}"]')
        self.page.click("button#accept")
        self.page.wait_for_selector("main#consent")

    def cancel(self) -> None:
        self.page.click("button#cancel")
        self.page.wait_for_selector("main#consent")

    def outcome(self) -> str:
        return self.page.get_attribute("main#consent", "data-outcome") or ""

    def text(self, element_id: str) -> str:
        return self.page.inner_text(f"#{element_id}")

    def consent_cookie(self) -> dict[str, Any] | None:
        return next((k for k in self.context.cookies() if k["name"] == "mail2blob_consent"), None)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def env(stack, monkeypatch) -> dict[str, str]:
    return consent_env(stack, monkeypatch)


@pytest.fixture
def site(stack, env, app_server, chromium) -> Iterator[Site]:
    base = f"https://localhost:{app_server.server_address[1]}"
    stack.identity.add_redirect_uri(c.CLIENT_ID, f"{base}/api/consent/callback")
    site = Site(chromium, base)
    try:
        yield site
    finally:
        site.close()


def stored(stack) -> str | None:
    return stack.keyvault.value(SECRET_NAME)


# ---------------------------------------------------------------------------- tests


def test_sign_in_lands_on_the_success_page_and_a_replay_fails(stack, site):
    site.open_consent()
    cookie = site.consent_cookie()
    assert cookie is not None
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "None"
    assert cookie["path"] == "/api/consent" and cookie["domain"] == "localhost"
    assert site.page.url.startswith(stack.identity.authority)

    site.sign_in(c.MAILBOX)
    assert site.outcome() == "saved", site.page.content()
    assert site.page.url == site.callback_url
    assert site.text("mailbox") == c.MAILBOX
    assert site.text("account") == c.MAILBOX
    assert "The next scheduled drain runs at" in site.text("next-drain")
    assert site.consent_cookie() is None  # cleared once used
    assert stored(stack)
    versions = stack.keyvault.versions(SECRET_NAME)
    # Nothing on the page violated its Content-Security-Policy.
    assert not [m for m in site.console if "Content Security Policy" in m], site.console

    # Replay the callback exactly as the browser sent it, with the old cookie put back.
    assert len(site.callback_posts) == 1
    fields = dict(parse_qsl(site.callback_posts[0]))
    assert {"code", "state"} <= fields.keys()
    site.context.add_cookies([cookie])
    replay = site.context.request.post(site.callback_url, form=fields)
    assert replay.status == 400
    assert 'data-outcome="unknown_flow"' in replay.text()
    assert fields["code"] not in replay.text() and fields["state"] not in replay.text()
    # ... and as a callback URL opened in the browser.
    site.page.goto(f"{site.callback_url}?{site.callback_posts[0]}")
    assert site.outcome() in ("unknown_flow", "no_flow")
    assert stack.keyvault.versions(SECRET_NAME) == versions
    assert stack.identity.count("authorization_code") == 1


def test_wrong_account_is_refused_and_named(stack, site):
    site.open_consent()
    site.sign_in(c.OTHER_USER)
    assert site.outcome() == "login_refused"
    message = site.text("message")
    assert c.OTHER_USER in message and c.MAILBOX in message
    assert site.text("account") == c.OTHER_USER
    assert stored(stack) is None


def test_refusal_on_the_sign_in_page(stack, site):
    site.open_consent()
    site.cancel()
    assert site.outcome() == "denied"
    assert site.text("aadsts") == "AADSTS65004"
    assert stored(stack) is None


def test_a_samesite_lax_cookie_would_not_survive_the_form_post(stack, site, monkeypatch):
    """Why the cookie is SameSite=None: with Lax, Chromium drops it on the cross-site POST from the
    sign-in page, and the callback cannot tell which flow the answer belongs to."""
    import functions.consent_http as consent_http

    original = consent_http._cookie
    monkeypatch.setattr(
        consent_http,
        "_cookie",
        lambda value, path, max_age: original(value, path, max_age).replace(
            "SameSite=None", "SameSite=Lax"
        ),
    )
    site.open_consent()
    assert site.consent_cookie()["sameSite"] == "Lax"
    site.sign_in(c.MAILBOX)
    assert site.outcome() == "no_flow"
    assert stored(stack) is None
    assert len(site.callback_posts) == 1  # the answer did arrive, just without the cookie
