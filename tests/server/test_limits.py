"""GET /api/limits serves the protocol's own bounds, to read-token holders like the rest of /api."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from avgctl.protocol import SetAutotune, bounds
from avgctl.server.app import create_app
from tests.support.servers import CONTROL, READ, WORKER, auth


def test_limits_are_the_protocols_bounds(client):
    out = client.get("/api/limits")
    assert out.status_code == 200, out.text
    served = out.json()
    assert served.pop("max_target_divergence") > 0  # a bound of SetAutotune, tested below
    assert served.pop("max_outer_lr") == 1e6  # SetOuterLr's own bound
    assert served == {
        "max_period": bounds.MAX_PERIOD,
        "max_hierarchy_levels": bounds.MAX_HIERARCHY_LEVELS,
        "max_ranks": bounds.MAX_RANKS,
        "max_scalars": bounds.MAX_SCALARS,
        "max_batch_records": bounds.MAX_BATCH_RECORDS,
        "job_id_max_length": bounds.JOB_ID_MAX_LENGTH,
        "job_id_pattern": bounds.JOB_ID_PATTERN,
    }


def test_the_served_target_bound_is_the_one_commands_are_checked_against(client):
    top = client.get("/api/limits").json()["max_target_divergence"]
    SetAutotune(enabled=True, target_divergence=top)
    with pytest.raises(ValueError):
        SetAutotune(enabled=True, target_divergence=top * 1.01)


@pytest.mark.parametrize(("token", "status"), [(CONTROL, 200), (READ, 200), (WORKER, 403), ("wrong", 401), (None, 401)])
def test_limits_need_a_read_or_control_token(settings, token, status):
    with TestClient(create_app(settings)) as anon:
        out = anon.get("/api/limits", headers=auth(token) if token else {})
    assert out.status_code == status, out.text
