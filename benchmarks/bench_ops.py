"""Throughput of `batch_invariant` vs `fast` ops at the shapes of a 135M model (SmolLM2-135M).

Hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64, vocab 49152. Prints one row per case and
the throughput ratio (fast time / batch-invariant time; ≥ 0.75 is the target), plus a layer-weighted total
for a training/prefill step and for a decode step. Run: `python benchmarks/bench_ops.py [--device cuda]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from treadle.ops.base import Ops
from treadle.ops.batch_invariant import BatchInvariantOps
from treadle.ops.fast import FastOps

D, INTER, H, HKV, HD, VOCAB, LAYERS = 576, 1536, 9, 3, 64, 49152, 30
LAYER_LINEARS = [(D, H * HD), (D, HKV * HD), (D, HKV * HD), (H * HD, D), (D, INTER), (D, INTER), (INTER, D)]


def _time(fn: Callable[[], object], device: str, reps: int) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # On CPU, process CPU time: wall time on a shared machine measures the neighbours (use --threads 1).
    clock = time.perf_counter if device == "cuda" else time.process_time
    fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = clock()
        fn()
        sync()
        samples.append(clock() - t0)
    return min(samples)  # the least-disturbed run: the machine may be shared


def main(device: str = "cpu", reps: int = 7, threads: int = 0) -> None:
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for k, n in LAYER_LINEARS]
    lm_head = torch.randn(VOCAB, D, device=device, dtype=dtype) / D**0.5
    impls: dict[str, Ops] = {"fast": FastOps(), "batch_invariant": BatchInvariantOps()}
    cases: dict[str, Callable[[Ops], object]] = {}
    for M in (512, 16, 1):
        x = torch.randn(M, D, device=device, dtype=dtype)
        xi = torch.randn(M, INTER, device=device, dtype=dtype)
        cases[f"layer linears M={M}"] = lambda o, x=x, xi=xi: [
            o.linear(xi if w.shape[1] == INTER else x, w) for w in weights
        ]
        cases[f"lm_head M={M}"] = lambda o, x=x: o.linear(x, lm_head)
    q, k, v = (torch.randn(1, H, 512, HD, device=device, dtype=dtype) for _ in range(3))
    causal = torch.ones(512, 512, dtype=torch.bool, device=device).tril()[None]
    cases["attention prefill T=512"] = lambda o: o.attention(q, k, v, causal, HD**-0.5)
    qd = torch.randn(16, H, 1, HD, device=device, dtype=dtype)
    for S in (128, 512):
        kd, vd = (torch.randn(16, H, S, HD, device=device, dtype=dtype) for _ in range(2))
        ones = torch.ones(16, 1, S, dtype=torch.bool, device=device)
        cases[f"attention decode B=16 S={S}"] = lambda o, kd=kd, vd=vd, ones=ones: o.attention(
            qd, kd, vd, ones, HD**-0.5
        )
    hs = torch.randn(512, D, device=device, dtype=dtype)
    cases["rmsnorm M=512"] = lambda o: o.rmsnorm(hs, hs[0], 1e-5)
    logits = torch.randn(512, VOCAB, device=device)
    cases["log_softmax 512x49152"] = lambda o: o.log_softmax(logits, -1)

    times: dict[str, dict[str, float]] = {}
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}")
    print(f"{'case':32s} {'fast ms':>9s} {'inv ms':>9s} {'ratio':>6s}")
    with torch.no_grad():
        for name, fn in cases.items():
            times[name] = {m: _time(lambda fn=fn, o=o: fn(o), device, reps) for m, o in impls.items()}
            t = times[name]
            print(
                f"{name:32s} {t['fast'] * 1e3:9.3f} {t['batch_invariant'] * 1e3:9.3f} {t['fast'] / t['batch_invariant']:6.2f}"
            )

    # A step of the whole model, weighted by how often each op runs (attention once per layer, the norm twice).
    def step(mode: str, M: int, attn: str) -> float:
        t = times
        return (
            LAYERS
            * (t[f"layer linears M={M}"][mode] + t[attn][mode] + 2 * t["rmsnorm M=512"][mode] * M / 512)
            + t[f"lm_head M={M}"][mode]
        )

    for label, M, attn in [
        ("prefill/train step, 512 tokens", 512, "attention prefill T=512"),
        ("decode step, 16 seqs, S=128", 16, "attention decode B=16 S=128"),
        ("decode step, 16 seqs, S=512", 16, "attention decode B=16 S=512"),
    ]:
        f, i = step("fast", M, attn), step("batch_invariant", M, attn)
        print(f"{label:32s} {f * 1e3:9.2f} {i * 1e3:9.2f} {f / i:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args()
    main(args.device, args.reps, args.threads)
