"""Run with `torchrun --nproc-per-node 2 tests/fsdp_probe.py OUT.json` (CPU, gloo): a patched tiny model,
each decoder layer sharded with torch's FSDP2 (``fully_shard``), forward + backward through LSSAR on a
different batch per rank. Rank 0 writes the gathered losses and the full gradient norm to OUT.json
for tests/test_training_modes.py to compare with one unsharded process. (accelerate's FSDP config
does not shard on CPU: see docs/finetune.md, "Distributed training".)"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import lssa_hf
from tiny_models import tiny_model


def batch(rank):
    return torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(rank))


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = lssa_hf.patch(tiny_model("mistral"), variant="lssar", p=15.0).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    x = batch(rank)
    loss = model(x, labels=x).loss
    loss.backward()  # FSDP reduce-scatters: gradients are averaged over ranks
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    sharded = type(next(model.parameters())).__name__
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": [t.item() for t in losses], "grad_norm": norm.item(), "param_type": sharded,
                       "processes": world, "patched": lssa_hf.is_patched(model)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
