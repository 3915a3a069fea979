"""A follower rank of a sharded engine: `python -m treadle.engine.shard_follower CMD_FD REPLY_FD`.

Started by `ShardedEngine` (treadle/engine/sharded.py, rank 0) with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE in
its environment. It joins the process group, loads the same model, shards its blocks, and then does exactly
what rank 0's commands on CMD_FD say, in their order (that order is the lockstep of the collectives):

    ("forward",)                          a forward with no backward (rank 0's sampler ran one): one
                                          all-gather per block, in order; the output is thrown away
    ("forward_backward", requests)        this rank's share (sharding.forward_backward_share), reply its rows
    ("create", id, cfg, weights) / ("remove", id) / ("copy", src, dst) / ("load", id, dir, optimizer) /
    ("optim_step", id, params)            the same adapter op as rank 0 (LoRA is replicated); reply an ack
    ("close",)                            leave the group and exit

Replies on REPLY_FD are ("ok", value) or ("err", message). It exits when CMD_FD reads EOF (rank 0 closed or
died), when its parent process is gone, or when a collective fails (a peer died): a follower never outlives
its engine.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist


def _watch_parent(parent: int) -> None:
    """Exit as soon as the process that started this one is gone (re-parenting changes getppid)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def main(cmd_fd: int, reply_fd: int) -> None:
    from treadle import ops
    from treadle.engine import losses, sharding
    from treadle.engine.placement.wire import recv, send
    from treadle.lora.bank import AdapterBank
    from treadle.models.loader import load_model

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    cmd = Connection(cmd_fd, writable=False)
    reply = Connection(reply_fd, readable=False)
    (spec,) = recv(cmd)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = sharding.rank_device(spec.device, rank)
    sharding.init_group(device, rank, world)
    ops.set_mode("batch_invariant" if spec.deterministic else "fast")
    loaded = load_model(spec.model, dtype=spec.dtype, device=device)
    model = loaded.model
    sharding.shard_blocks(model, sharding.device_mesh(world, device))
    bank = AdapterBank(model, max_rank=spec.max_lora_rank)
    cfg = loaded.config
    send(reply, ("ok", None))

    def forward_backward(requests: list[Any]) -> sharding.PerDatum:
        errors, per_datum = sharding.forward_backward_share(
            model,
            bank,
            requests,
            rank=rank,
            world_size=world,
            vocab_size=cfg.vocab_size,
            max_len=loaded.max_context_length,
        )
        del errors  # rank 0 finds the same ones
        # to rank 0 as CPU tensors (unpickled CUDA tensors would land on this rank's GPU in rank 0's process)
        return {
            key: (lp.cpu(), losses.LossOutput(out.loss.cpu(), _cpu(out.elementwise_loss), out.metrics))
            for key, (lp, out) in per_datum.items()
        }

    def create(adapter_id: str, lora_cfg: Any, weights: list[torch.Tensor]) -> None:
        bank.create(adapter_id, lora_cfg)
        with torch.no_grad():  # rank 0's initial weights: an unseeded init must not differ between ranks
            for p, w in zip(bank.trainable_parameters(adapter_id), weights, strict=True):
                p.copy_(w)

    acked = {
        "create": create,
        "remove": bank.remove,
        "copy": bank.copy,
        "load": lambda aid, d, optimizer: bank.load(aid, d, optimizer=optimizer),
        "optim_step": bank.optim_step,
    }
    dummy = torch.zeros(1, 1, dtype=torch.long, device=device)
    while True:
        try:
            msg = recv(cmd)
        except (EOFError, OSError):
            os._exit(0)  # rank 0 is gone
        kind = msg[0]
        if kind == "close":
            break
        if kind == "forward":
            with torch.inference_mode():  # a collective that fails (a peer died) ends this process
                model(dummy)
            continue
        if kind == "forward_backward":
            send(reply, ("ok", forward_backward(msg[1])))
            continue
        try:
            value = acked[kind](*msg[1:])
        except Exception as e:  # noqa: BLE001 - rank 0 decides what a failure here means
            send(reply, ("err", f"{type(e).__name__}: {e}"))
        else:
            send(reply, ("ok", value))
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]))
    except BaseException:  # noqa: BLE001 - a failed follower must leave, not linger
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
