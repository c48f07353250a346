"""Local SGD with PostLocalSGDOptimizer and a live-controlled averager.

torchrun --standalone --nproc-per-node 2 docs/examples/post_local_sgd.py
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.optim import PostLocalSGDOptimizer

from avgctl.worker import PeriodicAverager, connect

dist.init_process_group("gloo")
torch.manual_seed(0)  # the same initial weights on every rank
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

averager = PeriodicAverager(period=4, warmup_steps=10)  # torch's PeriodicModelAverager arguments
optimizer = PostLocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), averager)
link = connect(averager) if os.environ.get("AVGCTL_SERVER") else None  # optional: live metrics + control

torch.manual_seed(dist.get_rank())  # different data on every rank
try:
    for step in range(200):
        x = torch.randn(32, 16)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        averager.record(loss=loss)  # shown per rank on the dashboard
        optimizer.step()  # steps the optimizer, then averager.average_parameters(...)
    averager.flush()  # collect the last round's figures and command acks
    if dist.get_rank() == 0:
        print(f"rounds {averager.metrics.rounds}, last divergence {averager.metrics.last_round.divergence_mean:.2e}")
finally:
    if link is not None:
        link.close()
    dist.destroy_process_group()
