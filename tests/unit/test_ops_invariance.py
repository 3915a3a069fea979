"""Batch invariance of `BatchInvariantOps` on CPU in fp32: one row alone vs the same row inside batches.

Every check is bitwise (`torch.equal`). Accuracy and gradients are checked against `FastOps`.
"""

from __future__ import annotations

import random

import pytest
import torch

from treadle import ops
from treadle.ops import cpu_invariant
from treadle.ops.batch_invariant import BatchInvariantOps, with_reference_grad
from treadle.ops.fast import FastOps

BI = BatchInvariantOps()
FAST = FastOps()
BATCH_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33, 47, 64]


def _rows_alone_vs_batched(op, x_M_K: torch.Tensor, rng: random.Random) -> None:
    """For every batch size, put random rows at random positions and compare each to its solo result."""
    solo = [op(x_M_K[i : i + 1]) for i in range(x_M_K.shape[0])]
    for M in BATCH_SIZES:
        idx = [rng.randrange(x_M_K.shape[0]) for _ in range(M)]
        out = op(x_M_K[idx])
        for pos, i in enumerate(idx):
            assert torch.equal(out[pos : pos + 1], solo[i]), f"row {i} at position {pos} of batch {M}"


@pytest.mark.parametrize("K,N", [(64, 96), (96, 64), (8, 40), (40, 8), (576, 192)])
def test_linear_row_invariant(K: int, N: int) -> None:
    g = torch.Generator().manual_seed(K * 1000 + N)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(64, K, generator=g)
    _rows_alone_vs_batched(lambda t: BI.linear(t, W), x, random.Random(K))
    _rows_alone_vs_batched(lambda t: BI.linear(t, W, b), x, random.Random(N))


def test_linear_invariant_across_sequence_shapes_and_chunks() -> None:
    """A token's projection is the same in a (B, T) prefill, a 1-token decode, and past `ROW_CHUNK` rows."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 32, generator=g)
    x_B_T_K = torch.randn(3, cpu_invariant.ROW_CHUNK // 2 + 5, 32, generator=g)  # 3·T rows > ROW_CHUNK
    full = BI.linear(x_B_T_K, W)
    for b, t in [(0, 0), (1, 7), (2, x_B_T_K.shape[1] - 1), (1, cpu_invariant.ROW_CHUNK - x_B_T_K.shape[1])]:
        assert torch.equal(BI.linear(x_B_T_K[b : b + 1, t : t + 1], W)[0, 0], full[b, t])
        assert torch.equal(BI.linear(x_B_T_K[b, t], W), full[b, t])  # 1-D input


def test_matmul_row_invariant_2d_and_batched() -> None:
    g = torch.Generator().manual_seed(1)
    b_K_N = torch.randn(24, 40, generator=g)
    x = torch.randn(64, 24, generator=g)
    _rows_alone_vs_batched(lambda t: BI.matmul(t, b_K_N), x, random.Random(1))
    # batched: a (B, H, T, K) @ (B, H, K, N); one (b, t) alone vs in a batch of B with T rows
    a = torch.randn(6, 3, 19, 16, generator=g)
    bb = torch.randn(6, 3, 16, 12, generator=g)
    full = BI.matmul(a, bb)
    for b, t in [(0, 0), (3, 9), (5, 18)]:
        assert torch.equal(BI.matmul(a[b : b + 1, :, t : t + 1], bb[b : b + 1])[0, :, 0], full[b, :, t])
    assert torch.allclose(full, torch.matmul(a, bb), rtol=1e-5, atol=1e-5)
    v = torch.randn(16, generator=g)
    assert torch.allclose(BI.matmul(a, v), torch.matmul(a, v), rtol=1e-5, atol=1e-5)
    assert torch.allclose(BI.matmul(v, bb), torch.matmul(v, bb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [64, 576, 1000])
def test_rmsnorm_row_invariant(D: int) -> None:
    g = torch.Generator().manual_seed(D)
    w = torch.randn(D, generator=g)
    x = torch.randn(64, D, generator=g) * 3
    _rows_alone_vs_batched(lambda t: BI.rmsnorm(t, w, 1e-6), x, random.Random(D))


@pytest.mark.parametrize("V", [7, 100, 49152])
def test_softmax_log_softmax_row_invariant(V: int) -> None:
    g = torch.Generator().manual_seed(V)
    x = torch.randn(64, V, generator=g) * 4
    _rows_alone_vs_batched(lambda t: BI.log_softmax(t, dim=-1), x, random.Random(V))
    _rows_alone_vs_batched(lambda t: BI.softmax(t, dim=-1), x, random.Random(V + 1))
    # along a non-last dim: the batch dim is the last one here
    xt = x[:, :50].t().contiguous()  # (50, 64): reduce over dim 0, batch over dim 1
    full = BI.log_softmax(xt, dim=0)
    for j in [0, 17, 63]:
        assert torch.equal(BI.log_softmax(xt[:, j : j + 1], dim=0)[:, 0], full[:, j])


@pytest.mark.parametrize("L", [1, 3, 64, 576, 40000])
def test_sum_row_invariant(L: int) -> None:
    g = torch.Generator().manual_seed(L)
    x = torch.randn(64, L, generator=g)
    _rows_alone_vs_batched(lambda t: BI.sum(t, dim=-1), x, random.Random(L))
    x3 = torch.randn(5, L, 7, generator=g)  # reduce the middle dim
    full = BI.sum(x3, dim=1)
    assert torch.equal(BI.sum(x3[2:3, :, 4:5], dim=1)[0, 0], full[2, 4])


@pytest.mark.parametrize("width", [37, 1536])
def test_silu_row_invariant_and_accurate(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    x = torch.randn(64, width, generator=g) * 6
    _rows_alone_vs_batched(BI.silu, x, random.Random(width))
    assert torch.allclose(BI.silu(x), torch.nn.functional.silu(x), rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(BI.silu(xg).sum(), xg)
    xf = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.nn.functional.silu(xf).sum(), xf)
    assert torch.allclose(grad, want, rtol=1e-5, atol=1e-6)


def _causal(T: int, S: int) -> torch.Tensor:
    return torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]


def _qkv(B: int, H: int, T: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # (B, T, H, d) transposed, like the model hands them over (not contiguous)
    return tuple(torch.randn(B, T, H, d, generator=g).transpose(1, 2) for _ in range(3))  # type: ignore[return-value]


def test_attention_prefill_decode_padded_chunked_agree() -> None:
    H, d, T = 3, 16, 2 * cpu_invariant.KV_SPLIT + 21  # three KV splits, the last partial
    q, k, v = _qkv(1, H, T, d, 0)
    full = BI.attention(q, k, v, _causal(T, T)[None], d**-0.5)
    g = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    for t in [0, 1, cpu_invariant.KV_SPLIT - 1, cpu_invariant.KV_SPLIT, T - 1] + rng.sample(range(T), 6):
        S = t + 1
        dec = BI.attention(
            q[:, :, t : t + 1], k[:, :, :S], v[:, :, :S], torch.ones(1, 1, S, dtype=torch.bool), d**-0.5
        )
        assert torch.equal(dec[0, :, 0], full[0, :, t]), f"decode at {t}"
        # extra trailing key slots, masked out, filled with junk (a longer batch-mate's cache)
        extra = rng.choice([1, 5, cpu_invariant.KV_SPLIT, 150])
        k_pad = torch.cat([k[:, :, :S], 100 * torch.randn(1, H, extra, d, generator=g)], dim=2)
        v_pad = torch.cat([v[:, :, :S], 100 * torch.randn(1, H, extra, d, generator=g)], dim=2)
        mask = torch.zeros(1, 1, S + extra, dtype=torch.bool)
        mask[..., :S] = True
        padded = BI.attention(q[:, :, t : t + 1], k_pad, v_pad, mask, d**-0.5)
        assert torch.equal(padded[0, :, 0], full[0, :, t]), f"padded decode at {t}"
    # chunked prefill: queries [a, b) over keys [0, b)
    a, b = 40, 110
    chunk = BI.attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], _causal(b - a, b)[None], d**-0.5)
    assert torch.equal(chunk[0], full[0, :, a:b])


def test_attention_row_invariant_inside_batches() -> None:
    """One sequence alone vs at a random position among random sequences of other lengths (right-padded)."""
    H, d, T = 2, 8, 37
    q1, k1, v1 = _qkv(1, H, T, d, 5)
    alone = BI.attention(q1, k1, v1, _causal(T, T)[None], 0.3)
    rng = random.Random(1)
    for Bsz in [1, 2, 3, 8, 16, 64]:
        lens = [rng.randrange(1, 90) for _ in range(Bsz)]
        pos = rng.randrange(Bsz)
        lens[pos] = T
        Tmax = max(lens)
        q, k, v = (t.contiguous() for t in _qkv(Bsz, H, Tmax, d, Bsz))
        mask = torch.zeros(Bsz, Tmax, Tmax, dtype=torch.bool)
        for b, n in enumerate(lens):
            mask[b, :n, :n] = _causal(n, n)
            mask[b, n:, 0] = True  # padding queries attend one key so every row is valid
        q[pos, :, :T], k[pos, :, :T], v[pos, :, :T] = q1[0], k1[0], v1[0]
        out = BI.attention(q, k, v, mask, 0.3)
        assert torch.equal(out[pos, :, :T], alone[0]), f"batch {Bsz} position {pos}"


def test_matches_fast_ops() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 11, 96, generator=g)
    W, b = torch.randn(72, 96, generator=g), torch.randn(72, generator=g)
    w = torch.randn(96, generator=g)
    assert torch.allclose(BI.linear(x, W, b), FAST.linear(x, W, b), rtol=1e-5, atol=1e-5)
    assert torch.allclose(BI.rmsnorm(x, w, 1e-6), FAST.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    for dim in (-1, 1):
        assert torch.allclose(BI.softmax(x, dim), FAST.softmax(x, dim), rtol=1e-5, atol=1e-5)
        assert torch.allclose(BI.log_softmax(x, dim), FAST.log_softmax(x, dim), rtol=1e-5, atol=1e-5)
        assert torch.allclose(BI.sum(x, dim), FAST.sum(x, dim), rtol=1e-5, atol=1e-4)
    q, k, v = _qkv(2, 3, 150, 16, 7)
    mask = _causal(150, 150)[None].expand(2, 150, 150)
    assert torch.allclose(
        BI.attention(q, k, v, mask, 0.25), FAST.attention(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5
    )


def test_gradients_match_fast_ops() -> None:
    """The trainer backpropagates through these in deterministic mode: gradients must be the true ones."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 9, 32, generator=g)
    W0, w0 = torch.randn(24, 32, generator=g), torch.randn(32, generator=g)
    q0, k0, v0 = (t.contiguous() for t in _qkv(2, 2, 70, 8, 8))
    mask = _causal(70, 70)[None].expand(2, 70, 70)

    def grads(o) -> list[torch.Tensor]:
        x, W, w, q, k, v = (t.clone().requires_grad_(True) for t in (x0, W0, w0, q0, k0, v0))
        h = o.rmsnorm(o.linear(x, W), w[:24], 1e-6)
        lp = o.log_softmax(h, dim=-1)
        att = o.attention(q, k, v, mask, 0.3)
        loss = (lp * torch.linspace(-1, 1, 24)).sum() + (att * torch.linspace(0, 1, 8)).sum()
        loss.backward()
        return [t.grad for t in (x, W, w, q, k, v)]  # type: ignore[misc]

    for gb, gf in zip(grads(BI), grads(FAST), strict=True):
        assert torch.allclose(gb, gf, rtol=1e-4, atol=1e-5)


def test_reference_grad_wrapper_gives_reference_gradients() -> None:
    """The CUDA path's autograd wrapper (checked here with CPU kernels): forward of one, backward of the other."""
    g = torch.Generator().manual_seed(6)
    x0, W0, b0 = (
        torch.randn(4, 7, 16, generator=g),
        torch.randn(12, 16, generator=g),
        torch.randn(12, generator=g),
    )
    q0, k0, v0 = (t.contiguous() for t in _qkv(1, 2, 20, 8, 6))
    mask = _causal(20, 20)[None]
    leaves = [t.clone().requires_grad_(True) for t in (x0, W0, b0, q0, k0, v0)]
    x, W, b, q, k, v = leaves
    y = with_reference_grad(cpu_invariant.linear, FAST.linear, x, W, b)
    att = with_reference_grad(cpu_invariant.attention, FAST.attention, q, k, v, mask, 0.3)
    assert torch.equal(y, cpu_invariant.linear(x0, W0, b0))
    got = torch.autograd.grad((y * y).sum() + (att * att).sum(), leaves)
    leaves = [t.clone().requires_grad_(True) for t in (x0, W0, b0, q0, k0, v0)]
    x, W, b, q, k, v = leaves
    y, att = FAST.linear(x, W, b), FAST.attention(q, k, v, mask, 0.3)
    want = torch.autograd.grad((y * y).sum() + (att * att).sum(), leaves)
    for a, c in zip(got, want, strict=True):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5)
    # without grad, no wrapper: plain kernel output
    assert not with_reference_grad(cpu_invariant.linear, FAST.linear, x0, W0, None).requires_grad


def test_mode_switch_selects_batch_invariant() -> None:
    with ops.mode("batch_invariant") as o:
        assert isinstance(ops.current(), BatchInvariantOps) and o.name == "batch_invariant"
    assert ops.current().name == "fast"


def test_negative_control_fast_mode_reports() -> None:
    """With the mode off, report whether batching changed any bits on this machine (printed, not asserted)."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(96, 64, generator=g)
    x = torch.randn(64, 64, generator=g)
    differ = [M for M in BATCH_SIZES if not torch.equal(FAST.linear(x[:M], W)[:1], FAST.linear(x[:1], W))]
    print(f"fast linear: row 0 differs from its solo result at batch sizes {differ}")
