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
  *size*). Each split's scores and p·v are row-aligned GEMMs with fixed N and K; splits are merged in order
  with an online softmax, so a fully masked split (a longer batch-mate, a longer prefill, the causal
  future) leaves the running max alone and multiplies by exp(0) = 1 and adds exact zeros.

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
_FOLD = 2  # slices added before halving: few elementwise ops, at most 2× padding


def _pad_rows(x_M_K: torch.Tensor) -> torch.Tensor:
    pad = (-x_M_K.shape[0]) % ROW_ALIGN
    return F.pad(x_M_K, (0, 0, 0, pad)) if pad else x_M_K


def rows_matmul(x_M_K: torch.Tensor, b_K_N: torch.Tensor) -> torch.Tensor:
    """x @ b where each row's result is independent of M and of the row's position."""
    M = x_M_K.shape[0]
    if M == 0:
        return x_M_K.new_empty(0, b_K_N.shape[1])
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
    if M == 0 or a_B_M_K.shape[0] == 0:
        return a_B_M_K.new_empty(a_B_M_K.shape[0], M, b_B_K_N.shape[2])
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


def attention(
    q_B_H_T_d: torch.Tensor,
    k_B_H_S_d: torch.Tensor,
    v_B_H_S_d: torch.Tensor,
    mask_B_T_S: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Split-KV attention: `KV_SPLIT`-key splits from absolute position 0, merged in order (online softmax).

    A split is skipped for the leading query rows (in `ROW_ALIGN` steps) that may attend none of its keys in
    any batch row; that is bitwise the same as merging it, which would multiply by exp(0) = 1 and add 0.
    """
    B, H, T, d = q_B_H_T_d.shape
    S = k_B_H_S_d.shape[2]
    n = max(1, -(-S // KV_SPLIT))
    s_pad = n * KV_SPLIT - S
    t_pad = (-T) % ROW_ALIGN
    Tp = T + t_pad
    q = ((F.pad(q_B_H_T_d, (0, 0, 0, t_pad)) if t_pad else q_B_H_T_d) * scale).contiguous()
    k = F.pad(k_B_H_S_d, (0, 0, 0, s_pad)) if s_pad else k_B_H_S_d
    v = F.pad(v_B_H_S_d, (0, 0, 0, s_pad)) if s_pad else v_B_H_S_d
    # split-major views (no copy): each split's matrices are dense, only the batch stride is S·d
    kT_n_X_d_N = k.reshape(B * H, n, KV_SPLIT, d).permute(1, 0, 3, 2)
    v_n_X_N_d = v.reshape(B * H, n, KV_SPLIT, d).transpose(0, 1)
    mask = F.pad(mask_B_T_S, (0, s_pad, 0, t_pad), value=False) if (s_pad or t_pad) else mask_B_T_S
    mask_B_Tp_n_N = mask.reshape(B, Tp, n, KV_SPLIT)
    # first query row (rounded down to ROW_ALIGN) that may attend anything in split j, or Tp if none
    any_Tp_n = mask_B_Tp_n_N.any(-1).any(0)
    first_n = torch.where(
        any_Tp_n.any(0), any_Tp_n.int().argmax(0), torch.full_like(any_Tp_n[0], Tp, dtype=torch.long)
    )
    starts = [int(r) - int(r) % ROW_ALIGN for r in first_n.tolist()]

    num = q.new_zeros(B, H, Tp, d, dtype=torch.float32)
    den = q.new_zeros(B, H, Tp, dtype=torch.float32)
    m = q.new_full((B, H, Tp), float("-inf"), dtype=torch.float32)
    for j, r in enumerate(starts):
        if r >= Tp:
            continue
        rows = Tp - r
        s = bmm(q[:, :, r:].reshape(B * H, rows, d), kT_n_X_d_N[j]).view(B, H, rows, KV_SPLIT).float()
        s = s.masked_fill(~mask_B_Tp_n_N[:, r:, j, None].transpose(1, 2), float("-inf"))
        m_old = m[:, :, r:]
        m_new = torch.maximum(m_old, s.amax(-1).detach())  # max is exact: its order cannot matter
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_old - m_safe)  # exactly 1 when this split changes nothing for the row
        p = torch.exp(s - m_safe[..., None])  # masked entries are exactly 0
        pv = bmm(p.reshape(B * H, rows, KV_SPLIT).to(v.dtype), v_n_X_N_d[j])
        num_r = num[:, :, r:] * alpha[..., None] + pv.view(B, H, rows, d).float()
        den_r = den[:, :, r:] * alpha + fold_sum_lastdim(p)
        num = torch.cat([num[:, :, :r], num_r], dim=2) if r else num_r
        den = torch.cat([den[:, :, :r], den_r], dim=2) if r else den_r
        m = torch.cat([m[:, :, :r], m_new], dim=2) if r else m_new
    # padded query rows attend nothing; a 0 denominator there would poison the backward with NaN
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (num / den[..., None])[:, :, :T].to(q_B_H_T_d.dtype)
