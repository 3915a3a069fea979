"""Batch invariance of `BatchInvariantOps` on CUDA (Triton kernels) in bf16 and fp32; skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from treadle.ops import triton_kernels as tk
from treadle.ops.batch_invariant import BatchInvariantOps
from treadle.ops.fast import FastOps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BI = BatchInvariantOps()
FAST = FastOps()
BATCH_SIZES = [1, 2, 3, 7, 8, 16, 33, 64, 257, 2048]
DTYPES = [torch.bfloat16, torch.float32]


def _rows_alone_vs_batched(op, x_M_K: torch.Tensor, rng: random.Random) -> None:
    solo = [op(x_M_K[i : i + 1]) for i in range(x_M_K.shape[0])]
    for M in BATCH_SIZES:
        idx = [rng.randrange(x_M_K.shape[0]) for _ in range(M)]
        out = op(x_M_K[idx])
        for pos in rng.sample(range(M), min(M, 16)):
            assert torch.equal(out[pos : pos + 1], solo[idx[pos]]), f"position {pos} of batch {M}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_ops_invariant(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rng = random.Random(0)
    x = torch.randn(64, 576, generator=g, device="cuda").to(dtype)
    W = (torch.randn(1536, 576, generator=g, device="cuda") / 24).to(dtype)
    w = torch.randn(576, generator=g, device="cuda").to(dtype)
    _rows_alone_vs_batched(lambda t: BI.linear(t, W), x, rng)
    _rows_alone_vs_batched(lambda t: BI.matmul(t, W.t()), x, rng)
    _rows_alone_vs_batched(lambda t: BI.rmsnorm(t, w, 1e-6), x, rng)
    logits = torch.randn(64, 49152, generator=g, device="cuda").to(dtype) * 4
    _rows_alone_vs_batched(lambda t: BI.log_softmax(t, -1), logits, rng)
    _rows_alone_vs_batched(lambda t: BI.softmax(t, -1), logits, rng)
    _rows_alone_vs_batched(lambda t: BI.sum(t, -1), logits, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_decode_padded_batch(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    H, d, T = 9, 64, 300
    q, k, v = (torch.randn(1, H, T, d, generator=g, device="cuda").to(dtype) for _ in range(3))
    causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()[None]
    full = BI.attention(q, k, v, causal, d**-0.5)
    for t in [0, 63, 64, 200, T - 1]:
        S = t + 1
        ones = torch.ones(1, 1, S, dtype=torch.bool, device="cuda")
        dec = BI.attention(q[:, :, t : t + 1], k[:, :, :S], v[:, :, :S], ones, d**-0.5)
        assert torch.equal(dec[0, :, 0], full[0, :, t])
        k_pad = torch.cat([k[:, :, :S], torch.randn_like(k[:, :, :100])], dim=2)
        v_pad = torch.cat([v[:, :, :S], torch.randn_like(v[:, :, :100])], dim=2)
        mask = torch.zeros(1, 1, S + 100, dtype=torch.bool, device="cuda")
        mask[..., :S] = True
        assert torch.equal(
            BI.attention(q[:, :, t : t + 1], k_pad, v_pad, mask, d**-0.5)[0, :, 0], full[0, :, t]
        )
    for Bsz in [2, 16, 64]:
        pos = random.Random(Bsz).randrange(Bsz)
        qb, kb, vb = (torch.randn(Bsz, H, T + 40, d, device="cuda").to(dtype) for _ in range(3))
        qb[pos, :, :T], kb[pos, :, :T], vb[pos, :, :T] = q[0], k[0], v[0]
        mask = torch.ones(T + 40, T + 40, dtype=torch.bool, device="cuda").tril()[None].repeat(Bsz, 1, 1)
        mask[pos, :, T:] = False
        assert torch.equal(BI.attention(qb, kb, vb, mask, d**-0.5)[pos, :, :T], full[0])


def test_accuracy_and_gradients_match_fast() -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    x0 = torch.randn(3, 17, 64, generator=g, device="cuda")
    W0, w0 = torch.randn(48, 64, generator=g, device="cuda"), torch.randn(48, generator=g, device="cuda")
    q0, k0, v0 = (torch.randn(2, 3, 70, 16, generator=g, device="cuda") for _ in range(3))
    mask = torch.ones(70, 70, dtype=torch.bool, device="cuda").tril()[None].expand(2, 70, 70)

    def run(o) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (x0, W0, w0, q0, k0, v0)]
        x, W, w, q, k, v = leaves
        h = o.log_softmax(o.rmsnorm(o.linear(x, W), w, 1e-6), -1)
        att = o.attention(q, k, v, mask, 0.25)
        loss = (h * torch.linspace(-1, 1, 48, device="cuda")).sum() + (att * att).sum()
        return [h, att, *torch.autograd.grad(loss, leaves)]

    for a, b in zip(run(BI), run(FAST), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_negative_control_reports() -> None:
    """With fast kernels, report whether batching changed bits on this GPU (printed, not asserted)."""
    a = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    fast_diff = (FAST.matmul(a[:1], b) - FAST.matmul(a, b)[:1]).abs().max().item()
    inv_diff = (tk.linear(a[:1], b.t()) - tk.linear(a, b.t())[:1]).abs().max().item()
    print(f"bf16 mm row-0 max diff alone vs batch 2048: fast {fast_diff}, batch_invariant {inv_diff}")
    assert inv_diff == 0
