"""Batch-invariant ops in plain torch (the CPU half of `BatchInvariantOps`; also any non-CUDA device).

Why each op is invariant (checked by tests/unit/test_ops_invariance.py, which is the proof on a given machine):

- linear / matmul: CPU BLAS (oneDNN/MKL) picks a different kernel for M = 1, 2–3 and for the leftover rows
  when M is not a multiple of its micro-kernel height, and those kernels sum K in a different order. Rows are
  therefore padded to a multiple of `ROW_ALIGN` and fed in chunks of at most `ROW_CHUNK`, so every GEMM a
  row goes through is a full-micro-tile GEMM from the same small family of shapes; measured on this
  codebase's CI machine, such a row's bits do not depend on M or on its position.
- rmsnorm / sum: an explicit fold — pad the reduced dim to `n * lanes`, add the `n` slices elementwise in
  order, then halve the lanes — built only from elementwise adds, whose results cannot depend on other
  rows. The shape of the fold depends only on the reduced length.
- softmax / log_softmax: ATen's last-dim softmax kernels reduce each row on its own with row-relative
  vectorisation (one row never shares an accumulator with another), so the dim is moved last.
- attention: fixed-size KV splits aligned to absolute key position 0 (FlashDecoding with a fixed split
  *size*). Scores are row-aligned GEMMs with K = d; the row max over all splits is exact, so p = exp(s - max)
  does not depend on the split layout; each split's p and p·v are summed with a fixed fold and a GEMM with fixed
  K, and the splits' partial sums are added in order, so a fully masked split (a longer batch-mate, a longer
  prefill, the causal future) adds exact zeros.

Everything is differentiable torch, so autograd gives the backward pass; the stabilising maxima are detached,
which is exact because softmax does not depend on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROW_ALIGN = 4
ROW_CHUNK = 1024
KV_SPLIT = 64
Q_BLOCK = 512  # query rows per attention pass: bounds the scores held between its two passes to Q_BLOCK × S
_FOLD = 2  # slices added before halving: few elementwise ops, at most 2× padding


def _pad_rows(x_M_K: torch.Tensor) -> torch.Tensor:
    pad = (-x_M_K.shape[0]) % ROW_ALIGN
    return F.pad(x_M_K, (0, 0, 0, pad)) if pad else x_M_K


def rows_matmul(x_M_K: torch.Tensor, b_K_N: torch.Tensor) -> torch.Tensor:
    """x @ b where each row's result is independent of M and of the row's position."""
    M = x_M_K.shape[0]
    if M == 0:  # nothing to keep invariant; torch.mm keeps the (empty) result in the autograd graph
        return torch.mm(x_M_K, b_K_N)
    x_M_K = x_M_K.contiguous()
    outs = []
    for start in range(0, M, ROW_CHUNK):
        blk = x_M_K[start : start + ROW_CHUNK]
        outs.append(torch.mm(_pad_rows(blk), b_K_N)[: blk.shape[0]])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y_M_N = rows_matmul(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        y_M_N = y_M_N + bias  # added after the GEMM so the sum order of the dot product stays the GEMM's own
    return y_M_N.reshape(*x.shape[:-1], weight.shape[0])


def bmm(a_B_M_K: torch.Tensor, b_B_K_N: torch.Tensor) -> torch.Tensor:
    """Batched matmul; rows padded like `rows_matmul` so every matrix product has aligned M."""
    M = a_B_M_K.shape[1]
    if M == 0 or a_B_M_K.shape[0] == 0:  # as rows_matmul: an empty result stays in the graph
        return torch.bmm(a_B_M_K, b_B_K_N)
    outs = []
    for start in range(0, M, ROW_CHUNK):
        blk = a_B_M_K[:, start : start + ROW_CHUNK]
        pad = (-blk.shape[1]) % ROW_ALIGN
        padded = F.pad(blk, (0, 0, 0, pad)) if pad else blk
        outs.append(torch.bmm(padded.contiguous(), b_B_K_N)[:, : blk.shape[1]])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul semantics (broadcasting, 1-D operands) over invariant row GEMMs."""
    if a.dim() == 1:
        return matmul(a[None], b).squeeze(-2)
    if b.dim() == 1:
        return matmul(a, b[:, None]).squeeze(-1)
    if b.dim() == 2:
        y = rows_matmul(a.reshape(-1, a.shape[-1]), b)
        return y.reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return bmm(a3, b3).reshape(*batch, a.shape[-2], b.shape[-1])


def _fold_lanes(length: int) -> int:
    return 1 << max(0, math.ceil(length / _FOLD) - 1).bit_length()


def fold_sum_lastdim(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in an order fixed by its length alone (elementwise adds only)."""
    length = x.shape[-1]
    if length == 0:
        return x.sum(-1)
    lanes = _fold_lanes(length)
    n = -(-length // lanes)
    if n * lanes != length:
        x = F.pad(x, (0, n * lanes - length))
    acc = x[..., :lanes]
    for i in range(1, n):
        acc = acc + x[..., i * lanes : (i + 1) * lanes]
    while lanes > 1:
        lanes //= 2
        acc = acc[..., :lanes] + acc[..., lanes : 2 * lanes]
    return acc[..., 0]


def sum(x: torch.Tensor, dim: int) -> torch.Tensor:  # noqa: A001 - mirrors the Ops method name
    return fold_sum_lastdim(x.movedim(dim, -1))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    mean_sq = fold_sum_lastdim(x32 * x32) / x.shape[-1]
    y = x32 * torch.rsqrt(mean_sq + eps)[..., None]
    return (weight.float() * y).to(x.dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x) from exp, add and div, each of which gives the same bits in ATen's vectorised body and
    its scalar tail; `F.silu` does not, so its result for an element depends on where the element falls
    relative to a thread chunk's end (odd widths, odd thread counts)."""
    return x / (1 + torch.exp(-x))


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x.movedim(dim, -1).contiguous(), dim=-1).movedim(-1, dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.log_softmax(x.movedim(dim, -1).contiguous(), dim=-1).movedim(-1, dim)


def _split_groups(starts: list[int], Tp: int) -> list[tuple[int, int, int]]:
    """Runs (first_row, j0, j1) of consecutive KV splits that share their first row; splits no row uses are
    dropped. Decode puts every split in one run (one GEMM for all of them); causal prefill gets about one run
    per split, so the causal future is still skipped."""
    groups: list[tuple[int, int, int]] = []
    for j, r in enumerate(starts):
        if r >= Tp:
            continue
        if groups and groups[-1][0] == r and groups[-1][2] == j:
            groups[-1] = (r, groups[-1][1], j + 1)
        else:
            groups.append((r, j, j + 1))
    return groups


def attention(
    q_B_H_T_d: torch.Tensor,
    k_B_H_S_d: torch.Tensor,
    v_B_H_S_d: torch.Tensor,
    mask_B_T_S: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Split-KV attention (see `_attention_block`) over blocks of `Q_BLOCK` query rows.

    A query row's result does not depend on the other rows of its call (the chunked-prefill invariant), so
    blocking only bounds memory; `Q_BLOCK` is a multiple of `ROW_ALIGN`, so a block pads no rows but the last.
    """
    T = q_B_H_T_d.shape[2]
    if T <= Q_BLOCK:
        return _attention_block(q_B_H_T_d, k_B_H_S_d, v_B_H_S_d, mask_B_T_S, scale)
    blocks = [
        _attention_block(
            q_B_H_T_d[:, :, t : t + Q_BLOCK], k_B_H_S_d, v_B_H_S_d, mask_B_T_S[:, t : t + Q_BLOCK], scale
        )
        for t in range(0, T, Q_BLOCK)
    ]
    return torch.cat(blocks, dim=2)


def _attention_block(
    q_B_H_T_d: torch.Tensor,
    k_B_H_S_d: torch.Tensor,
    v_B_H_S_d: torch.Tensor,
    mask_B_T_S: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Split-KV attention: `KV_SPLIT`-key splits from absolute position 0, summed in split order.

    Two passes. The first computes every split's masked scores (row-aligned GEMMs with K = d, N = KV_SPLIT)
    and the row max over all of them, which is exact, so it does not depend on how the keys were split or
    padded. The second takes p = exp(s - max), sums p and p·v within each split (fixed-length fold, GEMM
    with K = KV_SPLIT) and adds the splits' partial sums in order. A split that is fully masked for a row
    (a longer batch-mate, a longer prefill, the causal future) adds exact zeros, so it may be skipped: for
    the leading query rows (in `ROW_ALIGN` steps) that attend none of its keys in any batch row, it is.
    Splits that share their first row go through one batched GEMM (decode: all of them at once).
    """
    B, H, T, d = q_B_H_T_d.shape
    S = k_B_H_S_d.shape[2]
    n = max(1, -(-S // KV_SPLIT))
    s_pad = n * KV_SPLIT - S
    t_pad = (-T) % ROW_ALIGN
    Tp = T + t_pad
    BH = B * H
    q = ((F.pad(q_B_H_T_d, (0, 0, 0, t_pad)) if t_pad else q_B_H_T_d) * scale).contiguous()
    k = F.pad(k_B_H_S_d, (0, 0, 0, s_pad)) if s_pad else k_B_H_S_d
    v = F.pad(v_B_H_S_d, (0, 0, 0, s_pad)) if s_pad else v_B_H_S_d
    k_X_n_N_d = k.reshape(BH, n, KV_SPLIT, d)
    v_X_n_N_d = v.reshape(BH, n, KV_SPLIT, d)
    mask = F.pad(mask_B_T_S, (0, s_pad, 0, t_pad), value=False) if (s_pad or t_pad) else mask_B_T_S
    mask_B_Tp_n_N = mask.reshape(B, Tp, n, KV_SPLIT)
    # first query row (rounded down to ROW_ALIGN) that may attend anything in split j, or Tp if none
    any_Tp_n = mask_B_Tp_n_N.any(-1).any(0)
    first_n = torch.where(
        any_Tp_n.any(0), any_Tp_n.int().argmax(0), torch.full_like(any_Tp_n[0], Tp, dtype=torch.long)
    )
    groups = _split_groups([int(r) - int(r) % ROW_ALIGN for r in first_n.tolist()], Tp)

    # Scores and softmax weights are kept for the real query rows only: padding rows exist for the GEMMs'
    # sake (aligned M), and in decode they would be three quarters of the elementwise work.
    m = q.new_full((B, H, T), float("-inf"), dtype=torch.float32)
    scores: list[torch.Tensor] = []
    for r, j0, j1 in groups:
        g, rows = j1 - j0, Tp - r
        q_X_g_R_d = q[:, :, r:].reshape(BH, 1, rows, d).expand(BH, g, rows, d).reshape(BH * g, rows, d)
        # a view, no copy, when the run is one split or all of them (prefill and decode)
        kT_X_g_d_N = k_X_n_N_d[:, j0:j1].reshape(BH * g, KV_SPLIT, d).transpose(1, 2)
        s_B_H_g_R_N = bmm(q_X_g_R_d, kT_X_g_d_N).view(B, H, g, rows, KV_SPLIT)[:, :, :, : T - r].float()
        keep_B_1_g_R_N = mask_B_Tp_n_N[:, r:T, j0:j1].transpose(1, 2)[:, None]
        s_B_H_g_R_N = s_B_H_g_R_N.masked_fill(~keep_B_1_g_R_N, float("-inf"))
        m_new = torch.maximum(m[:, :, r:], s_B_H_g_R_N.detach().amax(dim=(2, 4)))  # max is exact
        m = torch.cat([m[:, :, :r], m_new], dim=2) if r else m_new
        scores.append(s_B_H_g_R_N)
    # rows that attend nothing (padding) keep -inf; 0 there keeps exp finite (their p is all 0 anyway)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)

    num = q.new_zeros(B, H, T, d, dtype=torch.float32)
    den = q.new_zeros(B, H, T, dtype=torch.float32)
    for (r, j0, j1), s_B_H_g_R_N in zip(groups, scores, strict=True):
        g, rows = j1 - j0, Tp - r
        p = torch.exp(s_B_H_g_R_N - m_safe[:, :, None, r:, None])  # masked entries are exactly 0
        den_B_H_g_R = fold_sum_lastdim(p)
        p_rows = F.pad(p, (0, 0, 0, rows - (T - r))) if rows > T - r else p
        v_X_g_N_d = v_X_n_N_d[:, j0:j1].reshape(BH * g, KV_SPLIT, d)
        pv = bmm(p_rows.reshape(BH * g, rows, KV_SPLIT).to(v.dtype), v_X_g_N_d)
        pv_B_H_g_R_d = pv.view(B, H, g, rows, d)[:, :, :, : T - r].float()
        for i in range(g):  # in split order: the sum of a row never depends on how many splits follow
            num_r = num[:, :, r:] + pv_B_H_g_R_d[:, :, i]
            den_r = den[:, :, r:] + den_B_H_g_R[:, :, i]
            num = torch.cat([num[:, :, :r], num_r], dim=2) if r else num_r
            den = torch.cat([den[:, :, :r], den_r], dim=2) if r else den_r
    # a query row that attends nothing (allowed only for padding) would get 0/0 and poison the backward
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (num / den[..., None]).to(q_B_H_T_d.dtype)
