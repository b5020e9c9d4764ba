"""The API key file: keys are stored only as SHA-256 digests, one per line.

Format (``#`` starts a comment)::

    admin  sha256:<64 hex digits>  ops-team
    client sha256:<64 hex digits>  support-bot

``ragtune keys create --scope client|admin --file PATH [--label L]`` makes a random key,
prints it once and appends its digest; the plaintext is never written anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ragtune.fileio import atomic_write_text

SCOPES = ("client", "admin")
_LINE = re.compile(r"^(client|admin)\s+sha256:([0-9a-f]{64})(?:\s+(\S.*))?$")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class StoredKey:
    scope: str
    digest: str
    label: str = ""

    def line(self) -> str:
        return f"{self.scope} sha256:{self.digest}" + (f"  {self.label}" if self.label else "")


def read_key_file(path: Path) -> list[StoredKey]:
    """Parse the key file; any malformed line stops the server (never guess at access)."""
    keys = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(
                f"{path}:{number}: expected '<client|admin> sha256:<64 hex digits> [label]' "
                "(the file holds digests, never plaintext keys)"
            )
        keys.append(StoredKey(match[1], match[2], (match[3] or "").strip()))
    return keys


def create_key(path: Path, scope: str, label: str = "") -> str:
    """Append a new key's digest to the file (atomically) and return the plaintext key."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if any(c.isspace() or c == "#" for c in label):
        raise ValueError("a key label cannot contain spaces or '#'")
    key = f"rt-{scope}-{secrets.token_urlsafe(32)}"
    existing = ""
    if path.exists():
        read_key_file(path)  # refuse to extend a malformed file
        existing = path.read_text(encoding="utf-8")
        if existing and not existing.endswith("\n"):
            existing += "\n"
    atomic_write_text(path, existing + StoredKey(scope, key_digest(key), label).line() + "\n")
    return key


def add_keys_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="Manage API keys (stored as digests).")
    sub = parser.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="Create a key, print it once, store its digest.")
    create.add_argument("--scope", choices=SCOPES, required=True)
    create.add_argument("--file", required=True, type=Path, help="key file (api_key_file)")
    create.add_argument("--label", default="", help="a name for the key, kept in the file")
    create.set_defaults(handler=_run_create)


def _run_create(args: argparse.Namespace) -> int:
    key = create_key(args.file, args.scope, args.label)
    print(key)
    return 0
