"""Where the control exchange runs, and device-correct figures: CUDA tensors faked on a CPU machine.

``FakeTensorMode`` tensors carry a device without memory: ops on them raise on a CPU/CUDA mix and
on any host read, so what runs here without raising runs on a GPU without a copy or a sync.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from avgctl.worker import divergence
from avgctl.worker.device import Staged, backend_devices, exchange_placement
from avgctl.worker.layout import build_layout, make_plans
from avgctl.worker.options import AveragerOptions


@pytest.mark.parametrize(
    ("backend", "gloo", "device", "side_group"),
    [
        ("gloo", True, "cpu", False),
        ("cpu:gloo,cuda:nccl", True, "cpu", False),
        ("nccl", True, "cpu", True),  # a gloo group beside it: no device sync to read the result
        ("nccl", False, "cuda", False),  # no gloo at all: the group's own device
        ("mpi", True, "cpu", False),
        ("cuda:nccl", True, "cpu", True),
        ("some_plugin", True, "cpu", True),  # nothing known about it: never assume a CPU backend
    ],
)
def test_the_exchange_runs_where_it_needs_no_device_sync(backend, gloo, device, side_group):
    placement = exchange_placement(backend, gloo_available=gloo)
    assert (placement.device, placement.side_group) == (device, side_group), placement.why


def test_backend_strings_map_devices():
    assert backend_devices("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_devices("NCCL") == {"cuda": "nccl"}
    assert set(backend_devices("gloo")) == {"cpu", "cuda"}


def _fake_cuda_params():
    # Two devices: the layout without a flat buffer, whose every figure is built per parameter
    # (a flat buffer's own copy-in needs the CUDA runtime even for fake tensors).
    torch.manual_seed(0)
    sizes, devices = (300, 40, 5000), ("cuda:0", "cuda:1", "cuda:0")
    return [torch.nn.Parameter(torch.randn(n, device=d)) for n, d in zip(sizes, devices)]


@pytest.mark.parametrize("exact", [False, True])
def test_a_rounds_and_a_steps_figures_stay_on_the_device(exact):
    options = AveragerOptions(sample_size=256, exact_divergence=exact)
    plans = make_plans([300, 40, 5000], options)  # drawn on the CPU when a layout is built
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = _fake_cuda_params()
        layout = build_layout(params, names_by_id={}, options=options, tail=0, plans=plans)
        assert layout.flat is None and layout.device == torch.device("cuda:0")
        assert layout.plan.index.device.type == "cuda"  # moved once, not per call
        before, after = layout.samples(), layout.samples()
        figures = divergence.round_figures(before, after, layout.plan)
        assert figures.device.type == "cuda" and figures.shape == (len(params) + 1,)
        drift = divergence.drift(layout.drift_sample(), layout.drift_sample(), layout.drift_plan)
        assert drift.device.type == "cuda" and drift.dim() == 0
        loss = torch.ones((), device="cuda", dtype=torch.bfloat16)
        staged = Staged([drift, loss, 3.0, None])  # copied to the host without blocking
        assert [host.device.type for _, host, _ in staged._copies] == ["cpu"]


def test_a_host_read_under_fake_cuda_raises():
    """The check above would catch a host read: this is what one looks like."""
    plans = make_plans([300, 40, 5000], AveragerOptions())
    with FakeTensorMode(allow_non_fake_inputs=True):
        layout = build_layout(_fake_cuda_params(), names_by_id={}, options=AveragerOptions(), tail=0, plans=plans)
        with pytest.raises(Exception, match="data-dependent|local_scalar_dense|not linked"):
            float(divergence.drift(layout.drift_sample(), layout.drift_sample(), layout.drift_plan))


def test_figures_read_after_their_copy_lands():
    staged = Staged([torch.tensor(2.5), 1.0, None, torch.tensor(4, dtype=torch.int32)])
    assert staged.ready()
    assert staged.values() == [2.5, 1.0, None, 4.0]
