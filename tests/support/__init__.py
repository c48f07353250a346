"""What the tests share, and the benchmarks with them; no test module imports another.

- ``tokens``: the test tokens (``CONTROL``, ``READ``, ``WORKER``) and ``auth(token)``'s header.
- ``polling``: ``wait_for`` a condition that no event announces.
- ``servers``: the server in this process: ``make_settings``, ``ServerThread`` (a real uvicorn in
  a thread), ``running_server``.
- ``processes``: real processes: ``ServerProcess`` (``avgctl serve``), ``Workers`` (``torchrun``
  demo ranks), ``torchrun_demo`` (one 2-rank job, restarts optional), ``Api`` (the CLI's REST
  client), ``free_port``, ``listening``, ``alive``, ``descendants``, ``stop_tree``, ``rss_bytes``,
  and a slower ``wait_for``.
- ``fakes``: ``FakeAverager`` (one link's averager, with the real ``CommandLedger``),
  ``FakeJob`` (a job's ranks over ``/ws/worker``, acknowledging commands) and ``SteppedRank`` (a
  one-rank job driven call by call: steps, commands, a crash and a resume from a checkpoint).
- ``frames``: worker-protocol frames (``hello``, ``batch``), ``encoded`` batches,
  ``store_with_two_ranks``, and ``close_of`` (a websocket's close code and reason).
- ``strict``: ``strict_json`` (valid JSON as ``JSON.parse`` reads it) and ``NON_FINITE``.
- ``browser``: Debian's Chromium (``launch_chromium``, ``ARTIFACTS``), ``Console``, ``login``.
- ``distributed``: ``run_ranks``, a function on N real gloo ranks.
- ``workloads``: tiny deterministic models and steps for the distributed tests.
- ``load``: simulated ranks and dashboards against ``avgctl serve``; ``run_load`` (also
  ``bench/load.py``'s and ``bench/ingest.py``'s).
- ``faults``: the demo job against a killed, restarted and frozen server; ``run_faults`` (also
  ``bench/faults.py``'s).
"""
