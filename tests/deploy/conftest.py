"""Fixtures for the scale-out tests: a local S3-compatible server (moto in server mode)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ragtune.launcher import free_port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole session."""
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """A fresh bucket: (s3://bucket/prefix, fsspec options reaching the moto server)."""
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    options = {"endpoint_url": s3_endpoint}
    bucket = f"ragtune-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(bucket)
    return f"s3://{bucket}/store", options
