"""The dashboard's performance in Debian's Chromium (issue 17): a live job of many ranks, and a long
job's history.

Run: ``.venv/bin/python bench/dashboard.py`` (about 12 minutes; ``--minutes 1`` for a short look).

1. Live: ``--ranks`` (256) simulated ranks send ``--rate`` (10) batches a second each (a step per
   batch, a round every 4 steps with 16 layers' shares) to ``avgctl serve`` for ``--minutes`` (10)
   while the job page is open. Every chart draw is a ``performance.measure`` (web/charts.js
   ``measured``), collected by a PerformanceObserver in the page: printed are the draws' and the
   animation frames' times (a frame's draws: measures run back to back), the long animation frames
   Chromium reports (> 50 ms, any cause), and the JS heap after a forced GC (CDP) each minute.
2. History: a job of ``--history-ranks`` (256) x ``--history-steps`` (100,000), built by
   bench/history.py's ``build`` (and cached where that bench caches it), is served and its page
   opened: printed is the time from navigation until the three per-rank charts have drawn, on the
   first load and on reloads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402

from avgctl.server.store import rollup  # noqa: E402
from bench import history as history_bench  # noqa: E402
from tests.support.browser import launch_chromium  # noqa: E402
from tests.support.load import SECRET, TOKEN, start_server, wait_http  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

JOB = "bench-dashboard"
JOB_OF_HISTORY = history_bench.JOB
LAYERS = 16
HISTORY_CHARTS = ("#chart-loss", "#chart-divergence", "#chart-drift")

# In the page before its scripts: every chart draw (measure) and long animation frame, kept until
# the bench takes them (so the page's own heap is not what grows).
OBSERVE = """
window.__draws = []; window.__loafs = [];
new PerformanceObserver((list) => { for (const e of list.getEntries()) if (e.name === 'avgctl-draw')
  window.__draws.push([e.startTime, e.duration, e.detail]); }).observe({ type: 'measure' });
// A long frame's duration and the script that took most of it (LoAF attribution).
const who = (e) => { const s = [...(e.scripts || [])].sort((a, b) => b.duration - a.duration)[0];
  return s ? `${s.invoker} ${(s.sourceURL || '').split('/').pop()}:${s.sourceFunctionName || ''}` : 'rendering'; };
try { new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__loafs.push([e.duration, who(e)]); })
  .observe({ type: 'long-animation-frame' }); } catch (err) { window.__loafs = null; }
"""
TAKE = "() => ({ draws: window.__draws.splice(0), loafs: window.__loafs ? window.__loafs.splice(0) : null })"
DRAWN = """(sels) => sels.every((s) => { const d = document.querySelector(s).dataset;
  return Number(d.points) > 0 && !d.loading; }) && performance.now()"""


def hello(rank: int, world: int) -> str:
    return json.dumps(
        {
            "kind": "hello",
            "job_id": JOB,
            "rank": rank,
            "world_size": world,
            "host": "bench",
            "pid": 20_000 + rank,
            "job_secret": SECRET,
            "step": 0,
            "config": {"kind": "periodic", "period": 4, "warmup_steps": 0},
            "control": {"period": 4, "warmup_steps": 0},
        }
    )


def batch(rank: int, step: int, seq: int) -> str:
    """One step of `rank` (and its round every 4 steps): a falling loss, drift and divergence per rank."""
    spread = 1 + 0.002 * rank + (0.3 if rank % 97 == 5 else 0.0)
    steps = [
        {
            "step": step,
            "time": time.time(),
            "step_time": 0.1,
            "drift": 0.01 * spread,
            "loss": spread * 3 / (1 + step / 500),
        }
    ]
    rounds = []
    if step % 4 == 0:
        raw = [1.0 + (i * 7 + step // 4) % LAYERS for i in range(LAYERS)]
        total = sum(raw)
        d = 0.05 * spread / (1 + step / 2000)
        rounds.append(
            {
                "step": step,
                "group_size": 256,
                "divergence": d,
                "relative_divergence": d / 10,
                "divergence_mean": 0.05,
                "divergence_max": 0.08,
                "relative_mean": 0.005,
                "relative_max": 0.008,
                "seconds": 0.002,
                "bytes": 1 << 20,
                "exact": True,
                "top_layers": [[f"layers.{i}", v / total] for i, v in sorted(enumerate(raw), key=lambda p: -p[1])],
                "layers_total": LAYERS,
            }
        )
    return json.dumps({"kind": "metrics", "steps": steps, "rounds": rounds, "control": [], "dropped": 0, "seq": seq})


async def _ranks(url: str, ranks: int, rate: float, seconds: float, ready) -> None:
    conns = []
    for rank in range(ranks):
        ws = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, compression=None)
        await ws.send(hello(rank, ranks))
        conns.append(ws)

    async def drain(ws) -> None:  # the server's acks, read so they do not pile up
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    readers = [asyncio.create_task(drain(ws)) for ws in conns]
    for rank, ws in enumerate(conns):
        await ws.send(batch(rank, 1, 0))
    ready.set()
    start = time.perf_counter()

    async def run(rank: int, ws) -> None:
        await asyncio.sleep(rank / ranks / rate)  # spread over the interval, as real ranks would be
        next_at = time.perf_counter()
        step = 1
        while next_at < start + seconds:
            step += 1
            await ws.send(batch(rank, step, step - 1))
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    await asyncio.gather(*(run(r, ws) for r, ws in enumerate(conns)))
    for ws in conns:
        await ws.close()
    for task in readers:
        task.cancel()


def ranks_main(url: str, ranks: int, rate: float, seconds: float, ready) -> None:
    asyncio.run(_ranks(url, ranks, rate, seconds, ready))


def stop(server) -> None:
    """SIGTERM, then SIGKILL if the server has not stopped within a minute (a large database's
    writer may be in a long transaction)."""
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def frames(draws: list) -> list[float]:
    """Draw time per animation frame: the draws of one frame run back to back (< 1 ms apart)."""
    out: list[float] = []
    end = -1e9
    for start, duration, _chart in sorted(draws):
        if start - end < 1.0 and out:
            out[-1] += duration
        else:
            out.append(duration)
        end = start + duration
    return out


def heap_mib(cdp) -> float:
    cdp.send("HeapProfiler.collectGarbage")
    return cdp.send("Runtime.getHeapUsage")["usedSize"] / 2**20


def live(browser, tmp: Path, ranks: int, rate: float, minutes: float) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(str(tmp / "live.db"), port)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    sim = None
    try:
        wait_http(base + "/api/health")
        seconds = minutes * 60
        sim = ctx.Process(
            target=ranks_main, args=(f"ws://127.0.0.1:{port}/ws/worker", ranks, rate, seconds, ready), daemon=True
        )
        sim.start()
        if not ready.wait(120):
            raise RuntimeError(f"{ranks} ranks did not connect within 120 s")
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.add_init_script(OBSERVE)
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/?token={TOKEN}#/jobs/{JOB}")
        page.wait_for_function(DRAWN, arg=list(HISTORY_CHARTS), timeout=60_000)
        cdp = page.context.new_cdp_session(page)
        print(f"live: {ranks} ranks x {rate:g} batches/s (a step each), {minutes:g} min, page open")
        print(" minute  draws  draw p50/p99/max ms  frame p50/p99/max ms  frames>50ms  long frames  heap MiB  step")
        all_draws: list = []
        loaf_all: list[float] | None = None
        heaps = [heap_mib(cdp)]
        t0 = time.perf_counter()
        minute = 0
        while sim.is_alive() and time.perf_counter() - t0 < seconds + 5:
            page.wait_for_timeout(min(60_000, max(1000, (t0 + 60 * (minute + 1) - time.perf_counter()) * 1000)))
            minute += 1
            got = page.evaluate(TAKE)
            draws = got["draws"]
            all_draws += draws
            if got["loafs"] is not None:
                loaf_all = (loaf_all or []) + got["loafs"]
            per_frame = frames(draws)
            heaps.append(heap_mib(cdp))
            step = page.locator("#job-step").inner_text()
            ms = [d[1] for d in draws]
            loafs = "n/a" if got["loafs"] is None else str(len(got["loafs"]))
            print(
                f" {minute:6d} {len(draws):6d}  {pct(ms, 0.5):5.1f} {pct(ms, 0.99):5.1f} {max(ms, default=0):6.1f}"
                f"         {pct(per_frame, 0.5):5.1f} {pct(per_frame, 0.99):5.1f} {max(per_frame, default=0):6.1f}"
                f"  {sum(f > 50 for f in per_frame):10d}  {loafs:>11}  {heaps[-1]:8.1f}  {step}",
                flush=True,
            )
        ms = [d[1] for d in all_draws]
        per_frame = frames(all_draws)
        by_chart: dict[str, list[float]] = {}
        for _s, d, chart in all_draws:
            by_chart.setdefault(chart or "?", []).append(d)
        print(
            f"live total: {len(ms)} draws, draw p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, max {max(ms, default=0):.1f} ms;"
            f" frames p99 {pct(per_frame, 0.99):.1f} ms, max {max(per_frame, default=0):.1f} ms, {sum(f > 50 for f in per_frame)} over 50 ms"
        )
        print(
            "  per chart (p50 / max ms): "
            + ", ".join(f"{c.lstrip('#')} {pct(v, 0.5):.1f} / {max(v):.1f}" for c, v in sorted(by_chart.items()))
        )
        print(
            f"  JS heap after GC: start {heaps[0]:.1f} MiB, after 1 min {heaps[min(1, len(heaps) - 1)]:.1f} MiB,"
            f" end {heaps[-1]:.1f} MiB, max {max(heaps):.1f} MiB"
        )
        if loaf_all is not None:
            durations = [d for d, _ in loaf_all]
            causes: dict[str, float] = {}
            for d, cause in loaf_all:
                causes[cause] = causes.get(cause, 0.0) + d
            top = sorted(causes.items(), key=lambda kv: -kv[1])[:3]
            print(
                f"  long animation frames (> 50 ms, any work): {len(durations)}, p50 {pct(durations, 0.5):.0f} ms,"
                f" max {max(durations, default=0):.0f} ms; most time in: "
                + "; ".join(f"{c} ({t:.0f} ms)" for c, t in top)
            )
        shown = {
            sel: page.locator(sel).evaluate("el => [el.dataset.points, el.dataset.bucketSteps, el.dataset.band]")
            for sel in HISTORY_CHARTS
        }
        print(
            "  at the end (points, bucket steps, band): " + ", ".join(f"{k.lstrip('#')} {v}" for k, v in shown.items())
        )
        print(f"  console errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
        page.context.close()
    finally:
        if sim is not None and sim.is_alive():
            sim.terminate()
        stop(server)


def history_db(ranks: int, steps: int, keep: int, cache: str) -> str:
    """bench/history.py's job of ``ranks`` x ``steps`` (rollups for every step, records for the last
    ``keep``), built by its ``build`` and kept in the same cache file it uses."""
    path = os.path.join(cache, f"r{ranks}-s{steps}-k{keep}-v{len(rollup.LEVELS)}.db")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        t = time.perf_counter()
        print(f"building {path}")
        history_bench.build(path + ".part", ranks, steps, keep)
        os.replace(path + ".part", path)
        print(f"history: built {ranks} ranks x {steps:,} steps in {time.perf_counter() - t:.0f} s")
    return path


def history(browser, ranks: int, steps: int, keep: int, cache: str) -> None:
    db = history_db(ranks, steps, keep, cache)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(db, port)
    try:
        wait_http(base + "/api/health")
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        times = []
        for attempt in range(4):
            url = f"{base}/?token={TOKEN}#/jobs/{JOB_OF_HISTORY}" if attempt == 0 else f"{base}/#/jobs/{JOB_OF_HISTORY}"
            page.goto("about:blank")
            page.goto(url)
            handle = page.wait_for_function(DRAWN, arg=list(HISTORY_CHARTS), polling="raf", timeout=60_000)
            times.append(handle.json_value())
            # The page's stream and its snapshot next: the reload waits for them, not to be slowed by them.
            page.wait_for_selector('#connection-state[data-state="connected"]', timeout=60_000)
            page.wait_for_load_state("networkidle")
        points = {sel: page.locator(sel).get_attribute("data-points") for sel in HISTORY_CHARTS}
        band = page.locator("#chart-loss").get_attribute("data-band")
        print(
            f"history page, {ranks} ranks x {steps:,} steps: charts drawn {times[0]:.0f} ms after navigation (first load),"
            f" then {statistics.median(times[1:]):.0f} ms (median of {len(times) - 1} reloads); band={band}, points {points}"
        )
        context.close()
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the live part")
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--rate", type=float, default=10.0, help="batches a second per rank")
    parser.add_argument("--history-ranks", type=int, default=256)
    parser.add_argument("--history-steps", type=int, default=100_000)
    parser.add_argument("--history-keep", type=int, default=20_000, help="steps of records kept (retention's default)")
    parser.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "avgctl-history-bench"),
        help="where the history job's database is kept between runs (bench/history.py's too)",
    )
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--skip-history", action="store_true")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = launch_chromium(p)
        print(f"chromium {browser.version}")
        if not args.skip_history:
            history(browser, args.history_ranks, args.history_steps, args.history_keep, args.cache)
        if not args.skip_live:
            live(browser, Path(tmp), args.ranks, args.rate, args.minutes)
        browser.close()


if __name__ == "__main__":
    main()
