import os

import pytest

from switchboard.server.core.backbone import Backbone
from tests.factories import KINDS, random_adapter, tiny_backbone

# Servers started by the tests (in this process or as subprocesses, which inherit the environment)
# compute in fp32, so their answers can be held to fp32 oracles at 1e-4. The default precision
# (`auto`) is tested on its own in tests/test_precision.py.
os.environ.setdefault("SWITCHBOARD_DTYPE", "fp32")
# Test servers run the engine in-process, so the many short-lived ones start in a few seconds; the
# worker layout (the default) is tested end to end in tests/test_engine_workers.py and test_precision.py.
os.environ.setdefault("SWITCHBOARD_ENGINE_WORKERS", "0")


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    return tiny_backbone()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random BERT saved as a model directory, for `switchboard serve --model`; and the backbone."""
    backbone = tiny_backbone(seed=7)
    path = tmp_path_factory.mktemp("tiny-model")
    backbone.model.save_pretrained(path)
    backbone.tokenizer.save_pretrained(path)
    return path, backbone


@pytest.fixture(scope="session")
def adapters(tiny_dir):
    backbone = tiny_dir[1]
    return {f"task-{i}": random_adapter(backbone.spec, seed=100 + i, backbone_model=backbone.model, **kw)
            for i, kw in enumerate(KINDS)}


@pytest.fixture(scope="session")
def pg_cluster():
    """One throw-away PostgreSQL cluster for the session (skips without PostgreSQL installed)."""
    from switchboard.clients.local_services import ServiceMissing, postgres_cluster

    try:
        with postgres_cluster() as cluster:
            yield cluster
    except ServiceMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture
def fresh_pg_cluster():
    """A cluster of its own, for a test that stops and starts it."""
    from switchboard.clients.local_services import ServiceMissing, postgres_cluster

    try:
        with postgres_cluster() as cluster:
            yield cluster
    except ServiceMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture
def nginx_proxy():
    """nginx(config_text, port) → its URL, for the test's lifetime (skips without nginx)."""
    from contextlib import ExitStack

    from switchboard.clients.local_services import ServiceMissing, nginx

    with ExitStack() as stack:
        def start(config_text: str, port: int) -> str:
            try:
                return stack.enter_context(nginx(config_text, port))
            except ServiceMissing as missing:
                pytest.skip(str(missing))

        yield start


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh database for one test."""
    return pg_cluster.new_database()
