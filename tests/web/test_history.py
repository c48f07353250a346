"""The job page's history in Debian's Chromium: the whole run from GET .../series, drag to zoom and
its request, live records at the right edge, 64 ranks as a band, the layer heatmap, CSV and log
scale. Jobs are fed through /ws/worker of a real server (one for the module); screenshots go to
artifacts/ (docs/ holds copies)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import expect
from websockets.sync.client import connect

from tests.support.browser import ARTIFACTS, login
from tests.support.frames import hello
from tests.support.servers import CONTROL, WORKER, ServerThread, make_settings

pytestmark = pytest.mark.browser

LONG = "history-long"  # 4 ranks, 2,000 steps, every layer's share sent
LONG_STEPS = 2000
WIDE = "history-wide"  # 64 ranks, 256 steps, 16 of 20 layers sent per round
WIDE_RANKS = 64
WIDE_STEPS = 256
OUTLIERS = {7: 0.5, 30: -0.4, 51: 0.3}  # rank -> how far its loss lies from the others'
LAYERS = [f"block.{i}" for i in range(20)]
ROUND_EVERY = 8


def loss(job: str, rank: int, step: int) -> float:
    if job == LONG:
        return 2.0 / (1 + step / 100) * (1 + 0.05 * rank)
    return 1.0 + 0.001 * rank + OUTLIERS.get(rank, 0.0) + 0.1 / step


def shares(job: str, step: int) -> list[list]:
    """Each layer's share of the divergence: 4 layers, all sent; or the top 16 of 20."""
    if job == LONG:
        raw = [1.0, 2.0, 3.0, 4.0 + step / LONG_STEPS]
        return [[f"layer.{i}", v / sum(raw)] for i, v in enumerate(raw)]
    raw = [1.0 + (i + step // ROUND_EVERY) % len(LAYERS) for i in range(len(LAYERS))]  # the top ones rotate
    top = sorted(range(len(LAYERS)), key=lambda i: -raw[i])[:16]
    return [[LAYERS[i], raw[i] / sum(raw)] for i in top]


def frames(job: str, rank: int, first: int, last: int) -> list[str]:
    """Metrics batches of `rank` for steps first..last, 500 steps a batch."""
    out = []
    for lo in range(first, last + 1, 500):
        hi = min(last, lo + 499)
        steps = [
            {"step": s, "time": 1000.0 + s, "step_time": 0.01, "drift": 0.1 + 0.01 * rank, "loss": loss(job, rank, s)}
            for s in range(lo, hi + 1)
        ]
        layers = len(LAYERS) if job == WIDE else 4
        rounds = [
            {
                "step": s,
                "group_size": 4,
                "divergence": 0.01 * (1 + rank) * (1 + s / 1000),
                "relative_divergence": 0.001 * (1 + rank),
                "divergence_mean": 0.02,
                "divergence_max": 0.04,
                "relative_mean": 0.002,
                "relative_max": 0.004,
                "seconds": 0.001,
                "bytes": 8,
                "exact": True,
                "top_layers": shares(job, s),
                "layers_total": layers,
            }
            for s in range(lo, hi + 1)
            if s % ROUND_EVERY == 0
        ]
        batch = {"kind": "metrics", "steps": steps, "rounds": rounds, "control": [], "dropped": 0, "seq": len(out)}
        out.append(json.dumps(batch))
    return out


def feed(server, job: str, world: int, first: int, last: int) -> None:
    """Every rank of `job` says hello and sends steps first..last; returns once the server says
    they are stored (its `stored` receipt for the last batch of each rank)."""
    url = server.url.replace("http", "ws", 1) + "/ws/worker"
    with contextlib.ExitStack() as stack:
        sent = []
        for rank in range(world):
            ws = stack.enter_context(connect(url, additional_headers={"Authorization": f"Bearer {WORKER}"}))
            link = f"{job}-{rank}-{first}"  # a link of its own: its batch numbers start at 0
            ws.send(hello(job_id=job, rank=rank, world_size=world, pid=300 + rank, step=first - 1, link=link))
            batches = frames(job, rank, first, last)
            for text in batches:
                ws.send(text)
            sent.append((ws, len(batches) - 1))
        for ws, seq in sent:
            while not ((msg := json.loads(ws.recv(timeout=30))).get("kind") == "stored" and msg["seq"] >= seq):
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(make_settings(tmp_path_factory.mktemp("history"), port=0)).start()
    try:
        feed(srv, LONG, 4, 1, LONG_STEPS)
        feed(srv, WIDE, WIDE_RANKS, 1, WIDE_STEPS)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def rest(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {CONTROL}"}, timeout=10) as client:
        yield client


def series_requests(page, name: str) -> list[dict]:
    """The query of every GET .../series?name=`name` the page makes from now on (a live list)."""
    seen: list[dict] = []

    def note(request):
        parts = urlsplit(request.url)
        if parts.path.endswith("/series"):
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if q.get("name") == name:
                seen.append(q | {"path": f"{parts.path}?{parts.query}"})

    page.on("request", note)
    return seen


def dataset(page, selector: str, key: str):
    return json.loads(page.locator(selector).get_attribute(f"data-{key}") or "null")


def open_job(page, server, job: str) -> None:
    login(page, server, route=f"#/jobs/{job}")
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")


def shot(page, selector: str, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(selector).screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_whole_run_then_a_drag_asks_for_that_range_at_its_resolution(server, page):
    loss_requests = series_requests(page, "loss")
    open_job(page, server, LONG)
    chart = "#chart-loss"
    # The whole run: its buckets are whole, so the range ends at the last one's end.
    expect(page.locator(chart)).to_have_attribute("data-range", re.compile(r"^\[0,\d+\]$"))
    whole_range = dataset(page, chart, "range")
    assert LONG_STEPS <= whole_range[1] < LONG_STEPS + 16
    whole = loss_requests[0]
    assert "from_step" not in whole and "to_step" not in whole
    width = page.locator(chart).evaluate("el => el.clientWidth")
    assert int(whole["points"]) == width  # a bucket per pixel
    coarse = int(page.locator(chart).get_attribute("data-bucket-steps"))
    assert coarse > 1

    box = page.locator(f"{chart} .u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.35, y, steps=4)
    with page.expect_request(lambda r: "/series?" in r.url and "name=loss" in r.url and "from_step" in r.url):
        page.mouse.up()
    zoom = loss_requests[-1]
    lo, hi = int(zoom["from_step"]), int(zoom["to_step"])
    assert 400 <= lo < hi <= 800  # a tenth of the plot, a quarter of the way in
    expect(page.locator(chart)).to_have_attribute("data-range", f"[{lo},{hi}]")
    expect(page.locator(chart)).to_have_attribute("data-bucket-steps", "1")  # ~200 steps on ~600 px
    first, last = dataset(page, chart, "steps")
    assert lo <= first and last <= hi
    # Every chart shows the zoom: the other history charts ask for it too, the live ones show it.
    expect(page.locator("#chart-divergence")).to_have_attribute("data-range", f"[{lo},{hi}]")
    expect(page.locator("#chart-period")).to_have_attribute("data-range", f"[{lo},{hi}]")
    expect(page.locator("#zoom-range")).to_contain_text(f"steps {lo}–{hi}")
    shot(page, ".charts", "history-zoom")

    page.locator(f"{chart} .u-over").dblclick()
    expect(page.locator(chart)).to_have_attribute("data-range", json.dumps(whole_range, separators=(",", ":")))
    expect(page.locator(chart)).to_have_attribute("data-bucket-steps", str(coarse))
    expect(page.locator("#zoom-reset")).to_be_hidden()

    # Live records append at the right edge: the range grows, nothing is asked again.
    asked = len(loss_requests)
    feed(server, LONG, 4, LONG_STEPS + 1, LONG_STEPS + 40)
    expect(page.locator(chart)).to_have_attribute("data-range", f"[0,{LONG_STEPS + 40}]")
    assert dataset(page, chart, "steps")[1] > LONG_STEPS
    assert len(loss_requests) == asked
    assert page.console.errors == []


def test_64_ranks_draw_a_band_with_the_furthest_ranks_named(server, page):
    open_job(page, server, WIDE)
    chart = page.locator("#chart-loss")
    expect(chart).to_have_attribute("data-band", "1")
    expect(chart).to_have_attribute("data-series", "6")  # max, min, median, 3 furthest ranks
    assert set(dataset(page, "#chart-loss", "outliers")) == set(OUTLIERS)
    labels = dataset(page, "#chart-loss", "labels")
    assert labels[:3] == ["group max", "group min", "group median"]
    assert {f"rank {r} (furthest)" for r in OUTLIERS} <= set(labels)
    legend = page.locator("#chart-loss .u-legend")
    expect(legend).to_contain_text("rank 7 (furthest)")
    medians = dataset(page, "#chart-loss", "medians")
    assert medians["group median"] == pytest.approx(1.0 + 0.001 * 31.5, abs=0.01)

    # The rank table sorts by any column; a selected rank is drawn on every per-rank chart.
    table = page.locator("#rank-table")
    expect(table.locator("tbody tr")).to_have_count(WIDE_RANKS)
    table.locator('th[data-key="loss"]').click()
    expect(table.locator("tbody tr").first).to_have_attribute("data-rank", "30")  # the lowest loss
    table.locator('th[data-key="loss"]').click()
    expect(table.locator('th[data-key="loss"]')).to_have_attribute("data-sort", "desc")
    expect(table.locator("tbody tr").first).to_have_attribute("data-rank", "7")  # the highest
    table.locator('tbody tr[data-rank="12"]').click()
    expect(table.locator('tbody tr[data-rank="12"]')).to_have_attribute("aria-selected", "true")
    expect(page.locator("#rank-pick")).to_have_value("12")
    for sel in ("#chart-loss", "#chart-drift", "#chart-divergence"):
        expect(page.locator(sel)).to_have_attribute("data-labels", re.compile(r'"rank 12 \(selected\)"'))
    page.locator("#rank-pick").select_option("51")  # already drawn: one of the furthest
    expect(chart).to_have_attribute("data-series", "6")
    expect(table.locator('tbody tr[data-rank="51"]')).to_have_attribute("aria-selected", "true")
    shot(page, "#chart-loss", "history-band")
    assert page.console.errors == []


def test_the_heatmap_shows_each_layers_share_and_says_when_only_the_top_layers_came(server, rest, page):
    with page.expect_request(lambda r: "/layers?" in r.url) as asked:
        open_job(page, server, WIDE)
    heat = page.locator("#chart-layers")
    expect(heat).to_have_attribute("data-layers", str(len(LAYERS)))
    expect(heat).to_have_attribute("data-complete", "0")
    expect(page.locator("#layers-note")).to_have_text(
        f"rank 0: top 16 of {len(LAYERS)} layers per round (the others were not sent: blank); darkest: 9.5%"
    )  # 20 / (1 + ... + 20)
    columns = WIDE_STEPS // ROUND_EVERY
    expect(heat).to_have_attribute("data-columns", str(columns))
    expect(heat).to_have_attribute("data-known", str(16 * columns))
    # The cells' colours: the largest share darkest, a share not sent blank.
    url = urlsplit(asked.value.url)
    answer = rest.get(f"{url.path}?{url.query}").json()
    cells = [(i, j, v) for i, row in enumerate(answer["shares"]) for j, v in enumerate(row)]
    top = max((c for c in cells if c[2] is not None), key=lambda c: c[2])
    unsent = next(c for c in cells if c[2] is None)
    pixel = """([i, j]) => {
      const c = document.querySelector('#chart-layers');
      const r = devicePixelRatio || 1;
      const cell = (c.clientWidth - 180) / Number(c.dataset.columns);
      const x = (180 + (j + 0.5) * cell) * r;
      const y = (i + 0.5) * 14 * r;
      return Array.from(c.getContext('2d').getImageData(Math.round(x), Math.round(y), 1, 1).data);
    }"""
    assert sum(page.evaluate(pixel, [top[0], top[1]])[:3]) < 400  # dark red
    assert page.evaluate(pixel, [unsent[0], unsent[1]])[:3] == [0xEC, 0xEF, 0xF1]  # the "not sent" grey
    shot(page, "#figure-layers", "history-layers")

    open_job(page, server, LONG)  # 4 layers, every share sent
    expect(page.locator("#layers-note")).to_have_text(re.compile(r"^rank 0: all 4 layers; darkest: 4\d\.\d%$"))
    expect(heat).to_have_attribute("data-complete", "1")
    assert page.console.errors == []


def test_csv_is_the_apis_answer_for_what_the_chart_shows(server, rest, page):
    open_job(page, server, WIDE)
    expect(page.locator("#chart-loss")).to_have_attribute("data-band", "1")
    with page.expect_request(lambda r: "/series?" in r.url and "name=loss" in r.url) as asked:
        with page.expect_download() as download:
            page.locator("#csv-loss").click()
    text = Path(download.value.path()).read_text()
    url = urlsplit(asked.value.url)
    answer = rest.get(f"{url.path}?{url.query}").json()
    rows = list(csv.reader(io.StringIO(text)))
    head = rows[0]
    ranks = sorted(answer["ranks"], key=int)
    assert head == [
        "step",
        *(f"rank {r} {f}" for r in ranks for f in ("min", "mean", "max")),
        "group min",
        "group median",
        "group max",
    ]
    assert [int(row[0]) for row in rows[1:]] == answer["steps"]
    cells = lambda row: [float(v) if v else None for v in row[1:]]  # noqa: E731
    for j, row in enumerate(rows[1:]):
        want = [answer["ranks"][r][f][j] for r in ranks for f in ("min", "mean", "max")]
        want += [answer["group"][f][j] for f in ("min", "median", "max")]
        assert cells(row) == want
    assert download.value.suggested_filename == f"{WIDE}-loss-{answer['from_step']}-{answer['to_step']}.csv"
    assert page.console.errors == []


def test_log_scale_smoothing_and_another_job_overlaid(server, page):
    open_job(page, server, LONG)
    chart = page.locator("#chart-loss")
    expect(chart).to_have_attribute("data-log", "0")
    raw = dataset(page, "#chart-loss", "medians")["rank 0"]
    page.locator("#log-scale").check()
    for sel in ("#chart-loss", "#chart-drift", "#chart-divergence"):
        expect(page.locator(sel)).to_have_attribute("data-log", "1")
        expect(page.locator(sel)).to_have_attribute("data-y-distr", "3")  # uPlot's log scale
    assert dataset(page, "#chart-loss", "medians")["rank 0"] == pytest.approx(raw)  # same figures
    shot(page, "#chart-loss", "history-log")
    last = dataset(page, "#chart-loss", "lasts")["rank 0"]
    page.locator("#smoothing").fill("0.9")
    expect(page.locator("#smoothing-value")).to_have_text("0.90")
    # A falling loss smoothed lags behind: its last point is above the raw last point.
    page.wait_for_function(
        "(last) => JSON.parse(document.querySelector('#chart-loss').dataset.lasts)['rank 0'] > last * 1.001", arg=last
    )
    page.locator("#log-scale").uncheck()
    expect(chart).to_have_attribute("data-y-distr", "1")
    assert math.isfinite(dataset(page, "#chart-loss", "lasts")["rank 0"])

    # Another job overlaid: its median, dashed, beside this job's ranks.
    page.locator("#compare-job").focus()
    page.locator("#compare-job").select_option(WIDE)
    expect(chart).to_have_attribute("data-labels", re.compile(rf'"{WIDE} \(median\)"\]$'))
    assert dataset(page, "#chart-loss", "medians")[f"{WIDE} (median)"] > 0.5  # the other job's losses, ~1
    assert page.console.errors == []
