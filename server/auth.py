"""API keys: client scope for /v1 routes, admin scope for adapter and index changes.

Keys are compared as SHA-256 digests in constant time and never logged; a key's id in logs
and the audit trail is the first 8 hex characters of its digest.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Request

from server.errors import AuthenticationError, PermissionDeniedError
from server.keys import key_digest, read_key_file


class KeyStore:
    """Digests only: plaintext keys from the environment are hashed at start and dropped."""

    def __init__(self, client_keys: list[str], admin_keys: list[str], key_file: Path | None = None):
        self._client = [key_digest(k) for k in client_keys]
        self._admin = [key_digest(k) for k in admin_keys]
        for stored in read_key_file(key_file) if key_file else []:
            (self._admin if stored.scope == "admin" else self._client).append(stored.digest)

    @property
    def enabled(self) -> bool:
        return bool(self._client or self._admin)

    @staticmethod
    def _matches(digest: str, known: list[str]) -> bool:
        found = False
        for candidate in known:  # no early exit: timing does not reveal which key matched
            found |= hmac.compare_digest(digest, candidate)
        return found

    def check_client(self, request: Request) -> str | None:
        """Return the caller's key id (None when auth is off); raise 401 otherwise."""
        if not self.enabled:
            return None
        digest = _bearer_digest(request)
        if self._matches(digest, self._client) or self._matches(digest, self._admin):
            return digest[:8]
        raise AuthenticationError("Incorrect API key provided.")

    def check_admin(self, request: Request) -> str:
        if not self._admin:
            raise PermissionDeniedError(
                "admin routes are disabled: set RAGTUNE_ADMIN_KEYS to enable them"
            )
        digest = _bearer_digest(request)
        if self._matches(digest, self._admin):
            return digest[:8]
        if self._matches(digest, self._client):
            raise PermissionDeniedError("this API key has no admin scope")
        raise AuthenticationError("Incorrect API key provided.")


def _bearer_digest(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    return key_digest(token.strip())
