import pytest

from server.backbone import Backbone
from tests.factories import tiny_backbone


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    return tiny_backbone()
