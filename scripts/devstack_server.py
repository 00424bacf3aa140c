"""Runs the local stack until stopped: ``scripts/devstack up`` starts this in the background.

Writes ``.devstack/env`` (settings for mail2blob plus DEVSTACK_* seeding credentials) once the
stack is up and a consented token cache for the stack's mailbox is in the vault stand-in.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tests.stack.local_stack import env_file_text, start_local_stack

ROOT = Path(__file__).resolve().parents[1]
DEVSTACK = ROOT / ".devstack"


def main() -> int:
    DEVSTACK.mkdir(exist_ok=True)
    stack, stop = start_local_stack(DEVSTACK / "run")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        import os

        os.environ.update(stack.azure_env())
        stack.azurite.blob_service().create_container("mail")
        stack.consent()
        env = DEVSTACK / "env"
        env.with_suffix(".tmp").write_text(env_file_text(stack))
        env.with_suffix(".tmp").replace(env)
        print(f"devstack up: settings in {env}", flush=True)
        done.wait()
    finally:
        (DEVSTACK / "env").unlink(missing_ok=True)
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
