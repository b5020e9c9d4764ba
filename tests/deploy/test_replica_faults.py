"""A replica whose base model cannot load takes no traffic and says why: `ragtune serve
--replicas` exits with the replicas' reason instead of serving (a local Ray cluster of its
own, after the module that shares one)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")

from server.deploy.process import start_replicated


@pytest.mark.slow
def test_a_replica_that_cannot_load_the_model_says_why(tmp_path) -> None:
    env = {
        "RAGTUNE_HOME": str(tmp_path / "home"),
        "RAGTUNE_MODEL__SOURCE": str(tmp_path / "no-such-model"),
        "RAGTUNE_SERVE__REPLICA_CPUS": "1",
    }
    with pytest.raises(RuntimeError) as error:
        start_replicated(env, tmp_path / "serve.log", replicas=1, ready_timeout=300)
    message = str(error.value)
    assert "server exited with 2" in message
    assert "model failed to load" in message and "no-such-model" in message
