"""Server-side vs client-side custom losses, and zstd forward_backward bodies, through the official SDK against
a `treadle serve` subprocess.

The same DPO-style loss runs as an uploaded graph (`create_custom_loss` handle: one forward_backward on the
server) and as the SDK's client-side `forward_backward_custom` (a forward, the loss and its gradient on the
client, then a surrogate cross-entropy backward: two passes and two round trips). The body row compares the
protobuf forward_backward body the SDK sends with its zstd-compressed form."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zstandard

from treadle.bench.api import _start_server
from treadle.bench.runner import Row


def dpo_style(logprobs, ref_logprobs, chosen, rejected):  # noqa: ANN001, ANN201 - traced by torch.fx
    delta = logprobs - ref_logprobs
    margin = 0.1 * ((delta * chosen).sum() - (delta * rejected).sum())
    return -F.logsigmoid(margin), {"custom/margin:mean": margin.detach()}


def _client_side(data: list[Any], logprobs_list: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    total = torch.zeros(())
    for d, lp in zip(data, logprobs_list, strict=True):
        inputs = [d.loss_fn_inputs[k].to_torch() for k in ("ref_logprobs", "chosen", "rejected")]
        loss, _ = dpo_style(lp, *inputs)
        total = total + loss
    return total, {}


def _data(n: int, length: int) -> list[Any]:
    from tinker import types

    g = np.random.default_rng(0)
    half = length // 2
    out = []
    for _ in range(n):
        toks = g.integers(100, 20000, size=length + 1).tolist()
        mask_c = [0.0] * 4 + [1.0] * (half - 4) + [0.0] * (length - half)
        mask_r = [0.0] * half + [1.0] * (length - half)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(toks[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(np.array(toks[1:], np.int64)),
                    "ref_logprobs": types.TensorData.from_numpy(np.full(length, -5.0, np.float32)),
                    "chosen": types.TensorData.from_numpy(np.array(mask_c, np.float32)),
                    "rejected": types.TensorData.from_numpy(np.array(mask_r, np.float32)),
                },
            )
        )
    return out


def bench_custom_loss(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    import tinker
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    n_datums, length, repeat = (4, 64, 3) if quick else (8, 256, 7)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start_server(model, tmp)
        try:
            sc = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            tc = sc.create_lora_training_client(base_model=model, rank=16, seed=0).result()
            ranks = {"logprobs": 1, "ref_logprobs": 1, "chosen": 1, "rejected": 1}
            handle = sc.create_custom_loss(dpo_style, input_ranks=ranks).result()  # pyright: ignore[reportArgumentType]
            data = _data(n_datums, length)
            server_s, client_s = [], []
            for i in range(repeat + 1):  # the first round warms both paths up
                t0 = time.perf_counter()
                tc.forward_backward_custom(data, handle).result()
                t1 = time.perf_counter()
                tc.forward_backward_custom(data, _client_side).result()
                t2 = time.perf_counter()
                if i:
                    server_s.append(t1 - t0)
                    client_s.append(t2 - t1)
            req = types.ForwardBackwardRequest(
                model_id=tc.model_id,
                seq_id=1,
                forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
            )
            raw = forward_backward_request_to_proto(req).SerializeToString()
            packed = zstandard.ZstdCompressor().compress(raw)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    server_p50, client_p50 = statistics.median(server_s), statistics.median(client_s)
    print(
        f"forward_backward_custom p50 ({n_datums}×{length} tokens): server-side {server_p50 * 1e3:.0f} ms, "
        f"client-side {client_p50 * 1e3:.0f} ms; body {len(raw)} B raw, {len(packed)} B zstd"
    )
    rows = [
        Row(
            f"custom loss {n_datums}x{length}: server-side vs client-side",
            1 / server_p50,
            1 / client_p50,
            "steps/s",
            1.3,
        ),
        Row("forward_backward body: zstd vs raw (1/bytes)", 1e6 / len(packed), 1e6 / len(raw), "1/MB", 1.5),
    ]
    return rows, {
        "server_s": server_s,
        "client_s": client_s,
        "body_bytes": {"raw": len(raw), "zstd": len(packed)},
    }
