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
same bits on every run. The forward is another matter: the all-gather re-assembles the exact weights, so in
deterministic mode (batch-invariant kernels: a row's result does not depend on its batch-mates) every datum's
logprobs and losses are bitwise those of the single-process run (tests/unit/test_fsdp_parity.py).

Lockstep (`forward_backward_share`): every rank plans the micro-batches from the WHOLE fused batch (so all
ranks agree on their number) and runs its round-robin share of each. FSDP all-gathers a block in every forward
and again in every backward that reaches it, so every rank must run, per micro-batch, one forward, and one
backward exactly when the micro-batch trains anything, reaching the same blocks. A rank whose share lacks one
of the micro-batch's trained adapters (or is empty) adds a one-token pad row through that adapter whose loss
weight is zero: it contributes exactly zero gradient but makes the rank's backward reach every block any
other rank's does (an unembed-only adapter reaches none, a full one all). A micro-batch that trains nothing
gets a forward-only pad row on an empty share.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from treadle.engine import losses, trainer
from treadle.engine.trainer import DEFAULT_MICROBATCH_TOKENS
from treadle.engine.types import Datum, ForwardBackwardRequest, ForwardBackwardResult
from treadle.errors import TreadleError
from treadle.lora.bank import AdapterBank
from treadle.models.causal_lm import CausalLM

# (request index, datum index) -> (target logprobs, the datum's loss output with its loss detached)
PerDatum = dict[tuple[int, int], tuple[torch.Tensor, losses.LossOutput]]


# Collectives wait this long for a peer: covers the skew between ranks within one op (not idle time: a rank
# only enters a collective when rank 0 has sent the op that issues it).
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


def rank_device(device: str, rank: int) -> str:
    """The device of `rank`: on CUDA each rank takes its own GPU ("cuda" or "cuda:0" -> "cuda:RANK")."""
    return f"cuda:{rank}" if device.startswith("cuda") else device


def init_group(device: str, rank: int, world_size: int, init_method: str = "env://") -> None:
    """Join the default process group: gloo on CPU, NCCL on CUDA devices."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=GROUP_TIMEOUT,
    )


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


def _pad_request(adapter_id: str | None) -> ForwardBackwardRequest:
    """One token through `adapter_id` with loss weight zero: its gradient is exactly zero (the loss is a
    `where` on the weight), but its backward runs through every block the adapter's LoRA reaches."""
    tokens = torch.zeros(1, dtype=torch.long)
    datum = Datum(tokens, {"target_tokens": tokens.clone(), "weights": torch.zeros(1)})
    return ForwardBackwardRequest(adapter_id, [datum], "cross_entropy", forward_only=adapter_id is None)


def forward_backward_share(
    model: CausalLM,
    bank: AdapterBank,
    requests: list[ForwardBackwardRequest],
    *,
    rank: int,
    world_size: int,
    vocab_size: int,
    max_len: int,
    microbatch_tokens: int = DEFAULT_MICROBATCH_TOKENS,
    group: dist.ProcessGroup | None = None,
) -> tuple[dict[int, TreadleError], PerDatum]:
    """This rank's part of a fused forward_backward that every rank runs with the same `requests` (module
    docstring: lockstep). Returns the invalid requests' errors (the same on every rank) and this rank's rows'
    results; afterwards every rank holds the same, summed adapter gradients (gradients accumulated by earlier
    calls are counted once: the followers drop their copy before the reduction and rank 0's stays)."""
    errors: dict[int, TreadleError] = {}
    rows: list[trainer._Row] = []
    for i, req in enumerate(requests):
        try:
            trainer.validate_request(req, bank, vocab_size, max_len)
        except TreadleError as e:
            errors[i] = e
            continue
        rows.extend(trainer._Row(i, j, d, req.adapter_id, req.forward_only) for j, d in enumerate(req.data))
    trained = sorted({r.adapter_id for r in rows if r.adapter_id is not None and not r.forward_only})
    if rank != 0:
        for aid in trained:
            bank.zero_grad(aid)
    per_datum: PerDatum = {}
    # each rank runs about a budget's worth of every micro-batch
    for mb in trainer._microbatches(rows, microbatch_tokens * world_size):
        mine = [mb[k] for k in deal_rows(len(mb), rank, world_size)]
        mb_trained = sorted({r.adapter_id for r in mb if r.adapter_id is not None and not r.forward_only})
        my_trained = {r.adapter_id for r in mine if not r.forward_only}
        pads = [a for a in mb_trained if a not in my_trained]
        if not mine and not mb_trained:
            pads = [None]
        reqs = requests + [_pad_request(a) for a in pads]
        mine += [
            trainer._Row(len(requests) + k, 0, reqs[len(requests) + k].data[0], a, a is None)
            for k, a in enumerate(pads)
        ]
        for r, lp, loss in trainer._run_microbatch(model, bank, mine, reqs):
            if r.request < len(requests):
                detached = losses.LossOutput(loss.loss.detach(), loss.elementwise_loss, loss.metrics)
                per_datum[(r.request, r.index)] = (lp, detached)
    if world_size > 1:
        reduce_adapter_grads(bank, trained, group)
    return errors, per_datum


def results(
    requests: list[ForwardBackwardRequest], errors: dict[int, TreadleError], per_datum: PerDatum
) -> list[ForwardBackwardResult | TreadleError]:
    """Every request's result from all ranks' rows (as `trainer.forward_backward` builds them)."""
    out: list[ForwardBackwardResult | TreadleError] = []
    for i, req in enumerate(requests):
        if i in errors:
            out.append(errors[i])
            continue
        done = [per_datum[(i, j)] for j in range(len(req.data))]
        out.append(
            ForwardBackwardResult(
                loss_fn_outputs=[
                    {"logprobs": lp.float().cpu()}
                    | (
                        {}
                        if loss.elementwise_loss is None
                        else {"elementwise_loss": loss.elementwise_loss.float().cpu()}
                    )
                    for lp, loss in done
                ],
                metrics=losses.merge_metrics([loss for _, loss in done]),
            )
        )
    return out
