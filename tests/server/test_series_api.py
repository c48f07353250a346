"""``GET /api/jobs/{id}/series`` and ``/layers`` over HTTP (TestClient, lifespan and store running):
answers as the contract spells them, 4xx with a reason for bad input, the read token suffices."""

from __future__ import annotations

from avgctl.protocol import MetricsBatch, RoundRecord
from tests.support.frames import batch, hello, uniform_round
from tests.support.polling import wait_for
from tests.support.servers import READ, WORKER, auth


def _round(step: int, layers: list[tuple[str, float]], total: int | None) -> RoundRecord:
    return uniform_round(step, 0.01, group_size=2).model_copy(update={"top_layers": layers, "layers_total": total})


def _job_with_records(client) -> None:
    with (
        client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0,
        client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r1,
    ):
        r0.send_text(hello(rank=0, pid=100))
        r1.send_text(hello(rank=1, pid=101))
        for first in range(1, 101, 20):  # the test server takes frames of at most 4 KB
            r0.send_text(batch(first, 20, rank_loss=1.0))
            r1.send_text(batch(first, 20, rank_loss=3.0))
        rounds = [_round(s, [("w", 0.75), ("b", 0.25)], 2) for s in (104, 108)]
        rounds += [_round(112, [("w", 0.5)], 40)]  # a large model's round: its top layers only
        r0.send_text(MetricsBatch(rounds=rounds).model_dump_json())
        wait_for(lambda: client.get("/api/jobs/job-1").json().get("step") == 112)


def test_a_series_as_the_contract_spells_it(client):
    _job_with_records(client)
    answer = client.get("/api/jobs/job-1/series", params={"name": "loss", "points": 10}).json()
    assert answer["name"] == "loss" and answer["bucket_steps"] == 16
    assert answer["steps"] == [0, 16, 32, 48, 64, 80, 96, 112] and answer["from_step"] == 0
    assert answer["ranks"]["0"]["mean"][:7] == [1.0] * 7 and answer["ranks"]["1"]["max"][:7] == [3.0] * 7
    assert answer["ranks"]["0"]["mean"][7] is None  # no step record there (only rounds)
    assert answer["group"] == {"min": [1.0] * 7 + [None], "median": [2.0] * 7 + [None], "max": [3.0] * 7 + [None]}
    one = client.get("/api/jobs/job-1/series?name=scalars.lr&ranks=1&from_step=10&to_step=20&points=100").json()
    assert list(one["ranks"]) == ["1"] and one["bucket_steps"] == 1 and one["steps"][0] == 10
    assert one["ranks"]["1"]["mean"] == [0.1] * 11
    # The read token is enough.
    assert client.get("/api/jobs/job-1/series?name=drift", headers=auth(READ)).status_code == 200


def test_bad_input_gets_a_reason(client):
    _job_with_records(client)
    cases = {
        "name=nope": "unknown series",
        "name=scalars.never": "has recorded no",
        "name=loss&points=0": "greater than or equal to 1",
        "name=loss&points=5001": "less than or equal to 5000",
        "name=loss&from_step=9&to_step=3": "before from_step",
        "name=loss&from_step=-1": "greater than or equal to 0",
        "name=loss&ranks=a,b": "ranks must be integers",
        "name=loss&to_step=99999999999999999999999": "",
        "": "name",
    }
    for query, reason in cases.items():
        answer = client.get(f"/api/jobs/job-1/series?{query}")
        assert answer.status_code == 422, (query, answer.text)
        assert reason in answer.text, (query, answer.text)
    many = ",".join(str(r) for r in range(4000))
    answer = client.get(f"/api/jobs/job-1/series?name=loss&points=5000&to_step=100000000&ranks={many}")
    assert answer.status_code == 422 and "fewer points or ranks" in answer.text
    assert client.get("/api/jobs/nope/series?name=loss").status_code == 404
    assert client.get("/api/jobs/nope/layers").status_code == 404
    assert client.get("/api/jobs/job-1/layers?points=0").status_code == 422


def test_layers_say_when_only_the_top_ones_came(client):
    _job_with_records(client)
    answer = client.get("/api/jobs/job-1/layers", params={"to_step": 108}).json()
    assert answer["layers"] == ["w", "b"] and answer["steps"] == [104, 108]
    assert answer["shares"] == [[0.75, 0.75], [0.25, 0.25]] and answer["complete"] is True
    answer = client.get("/api/jobs/job-1/layers").json()
    assert answer["complete"] is False and answer["layers_total"] == 40
    assert answer["shares"] == [[0.75, 0.75, 0.5], [0.25, 0.25, None]]
    merged = client.get("/api/jobs/job-1/layers?points=2").json()  # 3 rounds in 2 columns: means
    assert merged["steps"] == [104, 112] and merged["shares"][0] == [0.75, 0.5]
