"""``make demo``: mail2blob's main job on the local stack, no Azure account needed.

Starts Dovecot, Azurite and the identity and Key Vault stand-ins, consents (authorization-code
flow with PKCE through the identity stand-in; the token cache lands in the vault stand-in),
appends sample mail to the mailbox, runs ``python -m mail2blob drain`` exactly as a user would,
lists what landed in the container, and runs the drain once more: nothing is stored twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote

from tests.mailgen import make_large_message, make_messages
from tests.stack.local_stack import env_file_text, start_local_stack

SAMPLE_COUNT = 36


def run_cli(env_file: Path, *args: str) -> dict:
    command = [sys.executable, "-m", "mail2blob", "--env-file", str(env_file), *args]
    print("$ python -m mail2blob --env-file <stack env>", " ".join(args), flush=True)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL2BLOB_")}
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"drain failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mail2blob-demo-") as tmp:
        print("starting the local stack (Dovecot, Azurite, identity + Key Vault stand-ins)...")
        stack, stop = start_local_stack(Path(tmp) / "stack")
        try:
            os.environ.update(stack.azure_env())
            stack.consent()
            print(f"consented as {stack.env()['MAIL2BLOB_MAILBOX']}; token cache in the vault")
            messages = [*make_messages(SAMPLE_COUNT - 1, seed=2026), make_large_message(2)]
            # Received at the time of their Date header, so the container is browsable by date.
            stack.dovecot.append_many([{"msg": m, "date": sent_at(m)} for m in messages])
            print(f"appended {len(messages)} sample messages to the mailbox over IMAP\n")

            env_file = Path(tmp) / "env"
            env_file.write_text(env_file_text(stack))
            result = run_cli(env_file, "drain", "--json", "--quiet")
            show_container(stack)
            print(
                f"\nrun: stored {result['stored']}, already present {result['already_present']}, "
                f"failed {len(result['failed'])}, "
                f"{result['bytes'] / 1e6:.1f} MB in {result['seconds']:.2f} s, "
                f"backlog {result['backlog']}\n"
            )
            again = run_cli(env_file, "drain", "--json", "--quiet")
            print(
                f"second run: stored {again['stored']}, already present "
                f"{again['already_present']} (nothing is stored twice)"
            )
            ok = result["ok"] and again["ok"] and result["stored"] == len(messages)
            return 0 if ok and again["stored"] == 0 else 1
        finally:
            stop()


def sent_at(message: bytes) -> datetime:
    head = BytesHeaderParser().parsebytes(message)
    return parsedate_to_datetime(head["Date"])


def show_container(stack) -> None:
    container = stack.azurite.blob_service().get_container_client("mail")
    blobs = [b for b in container.list_blobs(include=["metadata"]) if b.name.endswith(".eml")]
    print(f"\ncontainer 'mail' now holds {len(blobs)} messages:")
    print(f"  {'size':>9}  {'subject':<40}  blob name")
    for blob in sorted(blobs, key=lambda b: b.name):
        subject = unquote(blob.metadata.get("subject", ""))[:40]
        print(f"  {blob.size:>9,}  {subject:<40}  {blob.name}")


if __name__ == "__main__":
    sys.exit(main())
