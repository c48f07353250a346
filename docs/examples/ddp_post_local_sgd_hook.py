"""DDP with torch's post_localSGD_hook: all-reduce gradients during warm-up, then average models.

torchrun --standalone --nproc-per-node 2 docs/examples/ddp_post_local_sgd_hook.py
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from avgctl.worker import PeriodicAverager, connect

WARMUP = 20  # must equal start_localSGD_iter, as with torch's own averagers

dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))
# After warm-up the hook all-reduces gradients within a subgroup (on GPUs, dist.new_subgroups() makes
# one per machine). In this CPU example each rank is its own "machine", so ranks train locally.
subgroup, _ = dist.new_subgroups(group_size=1)
model.register_comm_hook(
    PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=WARMUP), post_localSGD_hook
)

optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
averager = PeriodicAverager(period=8, warmup_steps=WARMUP)
averager.name_parameters(model)  # layer names in the per-layer divergence report
link = connect(averager) if os.environ.get("AVGCTL_SERVER") else None

torch.manual_seed(dist.get_rank())
try:
    for step in range(200):
        x = torch.randn(32, 16)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averager.record(loss=loss)
        averager.average_parameters(model.parameters())
    averager.flush()  # collect the last round's figures and command acks
    if dist.get_rank() == 0:
        print(f"rounds {averager.metrics.rounds}, top layers {averager.metrics.last_round.top_layers[:2]}")
finally:
    if link is not None:
        link.close()
    dist.destroy_process_group()
