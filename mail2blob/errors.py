"""Typed failures a caller can act on.

Every message here is written for the person running mail2blob: it says what went wrong and what
to do. None of them ever carries a token, a code or a secret.
"""

from __future__ import annotations

import re


class Mail2BlobError(Exception):
    """Base class of every failure mail2blob reports on purpose."""


def azure_reason(exc: BaseException) -> str:
    """Why an Azure SDK call failed, fit for a message: the service's error code and the HTTP
    status (``InvalidMetadata (HTTP 400)``), never the request or response bodies; for a
    transport failure its type and text."""
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # StorageErrorCode.INVALID_METADATA -> InvalidMetadata
    status = getattr(exc, "status_code", None)
    if status:
        return f"{code or type(exc).__name__} (HTTP {status})"
    if code:
        return str(code)
    # Transport errors quote the URL ("Max retries exceeded with url: /c/b?...&sig=..."): a SAS
    # signature in its query must not reach a log line or the checkpoint.
    text = _URL_QUERY.sub("?<query removed>", str(exc))
    return f"{type(exc).__name__}: {text[:300]}"


_URL_QUERY = re.compile(r"\?[^\s'\")]*")


class SettingsError(Mail2BlobError):
    """One or more settings are missing or invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"mail2blob is not configured correctly:\n{lines}")


class ConsentNeededError(Mail2BlobError):
    """No usable token: somebody has to open the consent link (again).

    ``aadsts`` is the AADSTS code Microsoft gave (``None`` when there simply is no token yet) and
    ``reason`` a plain-language explanation of it.
    """

    def __init__(self, message: str, *, aadsts: str | None = None, reason: str = "") -> None:
        self.aadsts = aadsts
        self.reason = reason
        super().__init__(message)


class TokenError(Mail2BlobError):
    """The identity platform refused a request for a reason consent cannot fix (configuration,
    credentials, throttling)."""

    #: ``error`` values worth another try: throttling, server errors, no answer.
    TRANSIENT = frozenset({"temporarily_unavailable", "server_error", "unreachable"})

    def __init__(self, message: str, *, aadsts: str | None = None, error: str | None = None):
        self.aadsts = aadsts
        self.error = error
        super().__init__(message)

    @property
    def transient(self) -> bool:
        return self.error in self.TRANSIENT


class TokenStoreError(Mail2BlobError):
    """The token cache could not be read from or written to its store (Key Vault)."""


class SourceError(Mail2BlobError):
    """The IMAP source failed: connection, login, folder or command."""


class LoginRefusedError(SourceError):
    """The IMAP server refused the XOAUTH2 login; the message names the likely causes."""


class SourceThrottledError(SourceError):
    """Exchange Online asked us to back off (``Request is throttled``)."""

    def __init__(self, message: str, backoff_seconds: float) -> None:
        self.backoff_seconds = backoff_seconds
        super().__init__(message)


class DestinationError(Mail2BlobError):
    """The blob container could not be written to or read from."""


class DrainBusyError(Mail2BlobError):
    """Another drain holds the lease on this mailbox's state; this run did nothing."""
