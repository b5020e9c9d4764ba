"""Prefix-cache tenants: one namespace per API key unless grouped or shared; a request's
cache_salt splits further; the namespace names no key."""

from __future__ import annotations

from ragtune.serve_config import ServeConfig
from server.keys import key_digest
from server.tenancy import bind_tenant, cache_namespace, reset_tenant, tenant_of


def _namespace(authorization: str | None, config: ServeConfig, salt: str | None = None) -> str:
    token = bind_tenant(authorization, config)
    try:
        return cache_namespace(salt)
    finally:
        reset_tenant(token)


def test_each_key_is_its_own_tenant() -> None:
    config = ServeConfig()
    a, b = _namespace("Bearer key-a", config), _namespace("Bearer key-b", config)
    assert a and b and a != b
    assert _namespace("Bearer key-a", config) == a
    assert "key-a" not in a and key_digest("key-a")[:8] not in a
    assert _namespace(None, config) == ""  # no key (auth off): one namespace
    assert _namespace(None, config, salt="s1") != ""  # a salt still splits


def test_grouped_keys_share_and_salt_splits() -> None:
    ids = [key_digest(k)[:8] for k in ("key-a", "key-b")]
    config = ServeConfig(tenants={"team": ids})
    assert tenant_of("Bearer key-a", config) == "tenant:team"
    assert _namespace("Bearer key-a", config) == _namespace("Bearer key-b", config)
    assert _namespace("Bearer key-a", config, "x") != _namespace("Bearer key-b", config, "y")
    assert _namespace("Bearer key-c", config) != _namespace("Bearer key-a", config)


def test_operator_can_share_everything() -> None:
    config = ServeConfig(shared_prefix_cache=True)
    assert _namespace("Bearer key-a", config) == _namespace("Bearer key-b", config) == ""
