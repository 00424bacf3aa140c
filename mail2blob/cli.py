"""``python -m mail2blob``: the same engine as the Function App, from a shell.

Exit status: 0 success, 1 the run failed (see the error), 2 bad settings or usage, 3 consent is
needed, 4 another drain of the mailbox is running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import ConsentNeededError, DrainBusyError, Mail2BlobError, SettingsError
from .settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_SETTINGS, EXIT_CONSENT, EXIT_BUSY = 0, 1, 2, 3, 4
_EXIT_BY_ERROR_KIND = {
    ConsentNeededError.__name__: EXIT_CONSENT,
    DrainBusyError.__name__: EXIT_BUSY,
}

logger = logging.getLogger("mail2blob")


def load_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (shell quoting, optional ``export``), as written by
    ``scripts/devstack up`` into ``.devstack/env``. Values already in the environment win."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:]
        key, sep, raw = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SettingsError([f"{path}:{number}: not a KEY=value line"])
        parts = shlex.split(raw) if raw.strip() else [""]
        values[key.strip()] = parts[0] if parts else ""
    return values


def _settings(args: argparse.Namespace) -> Settings:
    if args.env_file:
        for key, value in load_env_file(Path(args.env_file)).items():
            os.environ.setdefault(key, value)
    return Settings.from_env()


class _Progress:
    """A one-line progress display on a terminal's stderr."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def __call__(self, result) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        done = result.stored + result.already_present
        sys.stderr.write(
            f"\r{done} messages ({result.stored} new, {len(result.failed)} failed), "
            f"{result.bytes / 1e6:.1f} MB, {done / elapsed:.0f} msg/s   "
        )
        sys.stderr.flush()


def cmd_drain(args: argparse.Namespace) -> int:
    from .drain import drain_mailbox

    settings = _settings(args)
    progress = _Progress() if sys.stderr.isatty() and not args.quiet else None
    result = drain_mailbox(settings, progress=progress)
    if progress:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print(result.summary())
        for failure in result.failed[:20]:
            print(f"  failed: {failure.folder} uid {failure.uid}: {failure.reason}")
    if result.error_kind in _EXIT_BY_ERROR_KIND:
        return _EXIT_BY_ERROR_KIND[result.error_kind]
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from .status import mailbox_status

    status = mailbox_status(_settings(args))
    if args.json:
        print(json.dumps(status, sort_keys=True, default=str))
        return EXIT_OK
    token = status["token"]
    print(f"mailbox:  {status['mailbox']}")
    print(
        f"token:    {token['state']}"
        + (f" ({token.get('account')})" if token.get("account") else "")
    )
    if token.get("detail"):
        print(f"          {token['detail']}")
    if token.get("saved_at"):
        print(f"          cache saved {token['saved_at']}")
    for folder, info in (status.get("checkpoint") or {}).items():
        print(f"folder:   {folder}: {info}")
    last = status.get("last_run")
    if last:
        print(
            f"last run: {last.get('started_at')}: stored {last.get('stored')}, already present "
            f"{last.get('already_present')}, failed {last.get('failed')}, backlog "
            f"{last.get('backlog')}" + (f", error: {last['error']}" if last.get("error") else "")
        )
    else:
        print("last run: none")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mail2blob",
        description="Drain a Microsoft 365 mailbox over IMAP (OAuth2) into Azure Blob Storage.",
    )
    parser.add_argument(
        "--env-file", help="read MAIL2BLOB_* settings from this file (e.g. .devstack/env)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    drain = sub.add_parser("drain", help="store every new message once, then the post-action")
    drain.add_argument("--json", action="store_true", help="print the result as one JSON line")
    drain.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    drain.set_defaults(func=cmd_drain)

    status = sub.add_parser("status", help="token state, checkpoint per folder, last run")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    try:
        from .consent_cli import add_consent_parser
    except ImportError:  # pragma: no cover - consent arrives with its own module
        pass
    else:
        add_consent_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("azure", "msal", "urllib3", "imapclient"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_SETTINGS
    except ConsentNeededError as exc:
        print(f"consent needed: {exc}", file=sys.stderr)
        return EXIT_CONSENT
    except DrainBusyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BUSY
    except Mail2BlobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
