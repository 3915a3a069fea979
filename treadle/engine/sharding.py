"""One base model across N ranks with PyTorch FSDP2: the frozen decoder blocks are sharded, LoRA stays
replicated, and LoRA gradients are reduced in a fixed rank order.

Each rank holds 1/N of every decoder block's weights; `fully_shard` all-gathers a block just before it runs
(forward and the recomputation in backward) and frees the gathered copy after it. The embedding, final norm
and unembedding stay replicated: they are small next to the blocks, and SmolLM2-style tied embeddings would
otherwise be split across two FSDP groups. Base weights are frozen, so FSDP never reduce-scatters a base
gradient; the only gradients are the adapters', which every rank keeps whole (`AdapterBank` lives beside the
model, not inside it).

Data parallelism across ranks: a fused batch's rows are dealt to the ranks, each rank runs the ordinary
trainer on its rows, then `reduce_adapter_grads` sums the adapters' gradients. It all-gathers the per-rank
partial sums and adds them in rank order (never a ring all-reduce, whose summation order depends on
chunking), so a result never depends on which rank finished first. Bitwise equality with a single-process
run is not possible in general: a LoRA weight gradient is a reduction over the batch's tokens, and splitting
the tokens over ranks changes that reduction's tree (rank partial sums, then their sum) even when every
kernel is batch-invariant. What is bitwise at a fixed world size is repeatability: the same inputs give the
same bits on every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from treadle.lora.bank import AdapterBank
from treadle.models.causal_lm import CausalLM


def device_mesh(world_size: int, device: str = "cpu") -> DeviceMesh:
    """A 1-D mesh over the default process group. The device type is explicit: on a machine that has CUDA,
    a gloo group without it once had FSDP move parameters to CUDA (pytorch#132471)."""
    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world_size,))


def shard_blocks(model: CausalLM, mesh: DeviceMesh) -> None:
    """Shard every decoder block of `model` over `mesh` (in place); the rest of the model stays replicated."""
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)


def deal_rows(n_rows: int, rank: int, world_size: int) -> list[int]:
    """The rows of a fused batch that `rank` runs: round-robin, so ranks get equal shares of mixed lengths."""
    return list(range(rank, n_rows, world_size))


def reduce_adapter_grads(
    bank: AdapterBank, adapter_ids: Sequence[str], group: dist.ProcessGroup | None = None
) -> None:
    """Sum the adapters' gradients over all ranks, adding the ranks' partial sums in rank order.

    A rank that computed no gradient for a tensor contributes zeros, so every rank must call this with the
    same `adapter_ids` in the same order (the trainer's batch is the same on every rank).
    """
    world = dist.get_world_size(group)
    for adapter_id in adapter_ids:
        for p in bank.trainable_parameters(adapter_id):
            local = p.grad if p.grad is not None else torch.zeros_like(p)
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.contiguous(), group=group)
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            p.grad = total
