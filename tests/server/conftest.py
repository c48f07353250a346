from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from avgctl.server.app import create_app
from tests.support.servers import CONTROL, make_settings


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, max_frame_bytes=4096)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {CONTROL}"}) as c:
        yield c
