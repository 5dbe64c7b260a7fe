"""torchrun job for tests/test_distributed.py: a sharded seqpar.nn.DiagGRU layer, forward + backward at
module level (the layer and the autograd graph stay alive until exit), destroy_process_group, normal exit.
Must exit 0 every time (issue #9 item 7: SIGABRT "terminate called without an active exception" at exit),
and seqpar must not keep the destroyed process group alive (exit code 3 if it does)."""
import gc
import os
import sys
import weakref

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import seqpar.nn as snn  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
layer = snn.DiagGRU(3, 8, sequence_group=dist.group.WORLD)
x = torch.randn(64, 2, 3, requires_grad=True)
out, h_n = layer(x)
loss = out.square().sum() + h_n.sum()
loss.backward()
print(f"rank {rank} done", flush=True)
pg = weakref.ref(dist.group.WORLD)
dist.destroy_process_group()
gc.collect()
if pg() is not None:
    print(f"rank {rank}: the destroyed process group is still referenced: "
          f"{[type(r).__name__ for r in gc.get_referrers(pg())]}", flush=True)
    sys.exit(3)
