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

from .consent_cli import add_consent_parser
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


def _exit_status(run) -> int:
    if run.result.error_kind in _EXIT_BY_ERROR_KIND:
        return _EXIT_BY_ERROR_KIND[run.result.error_kind]
    return EXIT_OK if run.result.ok else EXIT_FAILED


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain every enabled source in turn (or ``--source``). With ``--json``: one JSON object per
    source, then a last line with the totals, ``sources`` and ``ok``. Exit status: that of the
    first source that did not succeed (0 when all did)."""
    from .fanout import drain_sources

    settings = _settings(args)
    show_progress = sys.stderr.isatty() and not args.quiet
    runs = drain_sources(
        settings,
        source_id=args.source,
        progress=(lambda _source: _Progress()) if show_progress else None,
    )
    if show_progress:
        sys.stderr.write("\n")
    for run in runs:
        if args.json:
            print(json.dumps(run.to_dict(), sort_keys=True))
            continue
        print(f"[{run.source.id}] {run.result.summary()}")
        for failure in run.result.failed[:20]:
            print(f"  failed: {failure.folder} uid {failure.uid}: {failure.reason}")
    codes = [_exit_status(run) for run in runs]
    if args.json:
        print(json.dumps(_summary(runs, codes), sort_keys=True))
    return next((code for code in codes if code != EXIT_OK), EXIT_OK)


def _summary(runs: list, codes: list[int]) -> dict:
    """The last ``drain --json`` line: the totals under the keys of one run's result (so a
    script written for one mailbox keeps working), plus ``sources``."""
    results = [run.result for run in runs]
    failed_run = next((r for r in results if r.error), None)
    return {
        "sources": [{"source": run.source.id, "outcome": run.outcome} for run in runs],
        "ok": all(code == EXIT_OK for code in codes),
        "complete": all(r.complete for r in results),
        "failed": [
            {"source": run.source.id, "folder": f.folder, "uid": f.uid, "reason": f.reason}
            for run in runs
            for f in run.result.failed
        ],
        "error": failed_run.error if failed_run else None,
        "error_kind": failed_run.error_kind if failed_run else None,
        "seconds": round(sum(r.seconds for r in results), 3),
        **{
            key: sum(getattr(r, key) for r in results)
            for key in ("stored", "already_present", "bytes", "backlog")
        },
    }


def cmd_status(args: argparse.Namespace) -> int:
    from .status import sources_status

    report = sources_status(_settings(args), source_id=args.source)
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
        return EXIT_OK
    print(
        f"sources from {report['origin']}: {'all healthy' if report['ok'] else 'NOT all healthy'}"
    )
    for status in report["sources"]:
        _print_source_status(status)
    return EXIT_OK


def _print_source_status(status: dict) -> None:
    token = status["token"]
    enabled = "" if status["enabled"] else " (disabled)"
    how = f"{status['auth']}, after {status['after']}"
    print(f"\n[{status['id']}]{enabled} {status['mailbox']} ({how})")
    print(
        f"token:    {token['state']}"
        + (f" {token['aadsts']}" if token.get("aadsts") else "")
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
    print(f"stored:   {status.get('stored')} in total")
    error = status.get("last_error")
    if error:
        print(f"last error: {error.get('at')}: {error.get('kind')}: {error.get('message')}")


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

    drain = sub.add_parser(
        "drain", help="drain every enabled source: store each new message once, then post-act"
    )
    drain.add_argument("--json", action="store_true", help="print the result as one JSON line")
    drain.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    drain.add_argument(
        "--source", metavar="ID", help="drain only this source (default: all enabled)"
    )
    drain.set_defaults(func=cmd_drain)

    status = sub.add_parser(
        "status", help="per source: token state, checkpoint per folder, last run, last error"
    )
    status.add_argument("--json", action="store_true")
    status.add_argument("--source", metavar="ID", help="only this source")
    status.set_defaults(func=cmd_status)

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
