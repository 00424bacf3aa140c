"""Which certificate authorities mail2blob trusts.

By default: the system's (IMAP) and certifi's (the Azure SDK and MSAL through requests). With
``MAIL2BLOB_CA_BUNDLE`` set, that file is trusted in addition, for IMAP and every HTTPS call:
private IMAP servers, TLS-inspecting proxies, and the local stack.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
import tempfile
import urllib.request
from pathlib import Path

import certifi


def ssl_context(extra_ca: str | None) -> ssl.SSLContext:
    """A verifying client context (hostname checked) that also trusts ``extra_ca``."""
    context = ssl.create_default_context()
    if extra_ca:
        context.load_verify_locations(cafile=extra_ca)
    return context


@functools.cache
def ca_bundle_path(extra_ca: str | None) -> str | None:
    """A PEM bundle of certifi's roots plus ``extra_ca``, for requests-based clients; ``None``
    means "use the library default"."""
    if not extra_ca:
        return None
    extra = Path(extra_ca).read_bytes()
    combined = Path(certifi.where()).read_bytes() + b"\n" + extra
    digest = hashlib.sha256(combined).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"mail2blob-ca-{digest}.pem"
    if not path.exists():
        # A temporary name of its own: concurrent runs (threads, processes) each write theirs
        # and the atomic replace leaves one complete file, whoever wins.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with open(fd, "wb") as out:
            out.write(combined)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    return str(path)


#: (connect, read) seconds for MSAL's requests: requests waits forever by default, so a hung
#: identity platform would hold a run until the Functions host kills it.
HTTP_TIMEOUT = (10, 30)


def http_session(extra_ca: str | None):
    """A ``requests.Session`` for MSAL that trusts ``extra_ca`` and times out.

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override a session's ``verify``, so when
    an extra CA is configured the session ignores the environment and takes its proxies explicitly.
    """
    import requests

    session = requests.Session()
    # requests has no session-wide timeout; MSAL documents this way of giving one.
    session.request = functools.partial(session.request, timeout=HTTP_TIMEOUT)  # type: ignore[method-assign]
    bundle = ca_bundle_path(extra_ca)
    if bundle:
        session.trust_env = False
        session.verify = bundle
        proxies = urllib.request.getproxies()
        session.proxies.update({k: v for k, v in proxies.items() if k in ("http", "https")})
    return session
