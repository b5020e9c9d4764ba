"""Which tenant a request belongs to, so the prefix cache keeps tenants apart.

A prefix-cache hit is faster than a miss, so a client who can time requests can learn
whether someone else sent a prompt that starts like its own. Blocks are therefore keyed by
the caller's tenant: its API key's id, unless the operator groups keys into one tenant
(`serve.tenants`) or declares every key one tenant (`serve.shared_prefix_cache`); a request
may add a `cache_salt` (as vLLM's) to keep even its own later requests from sharing.
The HTTP layer binds the tenant per request; the serving layer reads `cache_namespace()`
into `GenerationRequest.cache_namespace`, which the runner mixes into the block hashes.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar, Token

from ragtune.serve_config import ServeConfig
from server.keys import key_digest

_tenant: ContextVar[str] = ContextVar("ragtune_tenant", default="")


def tenant_of(authorization: str | None, config: ServeConfig) -> str:
    """'' (one shared namespace), 'tenant:<name>' or 'key:<key id>'."""
    if config.shared_prefix_cache:
        return ""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    key_id = key_digest(token.strip())[:8]  # the id the audit log and KeyStore use
    for tenant, key_ids in config.tenants.items():
        if key_id in key_ids:
            return f"tenant:{tenant}"
    return f"key:{key_id}"


def bind_tenant(authorization: str | None, config: ServeConfig) -> Token[str]:
    """Set the current request's tenant (returns the token to reset it with)."""
    return _tenant.set(tenant_of(authorization, config))


def reset_tenant(token: Token[str]) -> None:
    _tenant.reset(token)


def cache_namespace(cache_salt: str | None = None) -> str:
    """The prefix-cache namespace of the current request: '' when shared, else a digest of
    tenant and salt (fixed length; names no key)."""
    tenant = _tenant.get()
    if not tenant and not cache_salt:
        return ""
    return hashlib.sha256(f"{tenant}\0{cache_salt or ''}".encode()).hexdigest()[:32]
