import pytest

from switchboard.server.core.backbone import Backbone
from tests.factories import KINDS, random_adapter, tiny_backbone


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
