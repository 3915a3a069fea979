"""Segmented multi-adapter LoRA kernels in Triton (SGMV / BGMV, as in Punica and S-LoRA).

Rows of one batch are grouped by adapter into contiguous segments (see `treadle.lora.routing`); one launch
computes every segment's `y[s:e] (+)= scale_w * x[s:e] @ W_w^T` with W stacked over adapters `(n, N, K)`:
the shrink (`W = A`, N = rank) and the expand (`W = B`, N = out features, optionally adding into the base
projection's output in place). A segment whose adapter index is -1 (base model rows) writes zeros, or
nothing when adding. BGMV (each decode row its own adapter) is SGMV with one-row segments.

Two variants, chosen per call:
- `invariant=False` (fast): tile sizes follow the shapes (small row tiles for decode, larger for prefill), so
  an element's reduction order may change with the batch's shape.
- `invariant=True`: one tile configuration per dtype and the K loop runs in full inside a program (no split-K),
  so an output element's sum order depends only on K: a row's result is bitwise the same whatever rows,
  segments or adapters share its batch.

They run on CUDA tensors, and on CPU under `TRITON_INTERPRET=1` (how the default test suite checks them).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K) of the invariant variant: fixed per dtype, never chosen from the shape.
_INVARIANT_TILES: dict[torch.dtype, tuple[int, int, int]] = {
    torch.float32: (16, 32, 32),
    torch.bfloat16: (32, 64, 64),
    torch.float16: (32, 64, 64),
}


def _launch(kernel: Any, grid: tuple[int, ...]) -> Any:
    """`kernel[grid]`, typed loosely: pyright cannot see that Triton turns ints into `tl.constexpr`."""
    return kernel[grid]


@triton.jit
def _sgmv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_w_ptr,
    scale_ptr,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wa,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    ADD: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    widx = tl.load(seg_w_ptr + seg)
    if pid_m * BLOCK_M < length:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < length
        col_ok = offs_n < N
        y_ptrs = y_ptr + (start + offs_m)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        out_mask = row_ok[:, None] & col_ok[None, :]
        if widx >= 0:
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            x_base = x_ptr + (start + offs_m)[:, None] * stride_xm
            w_base = w_ptr + widx.to(tl.int64) * stride_wa + offs_n[None, :] * stride_wn
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                a = tl.load(
                    x_base + kk[None, :] * stride_xk, mask=row_ok[:, None] & (kk[None, :] < K), other=0.0
                )
                b = tl.load(
                    w_base + kk[:, None] * stride_wk, mask=(kk[:, None] < K) & col_ok[None, :], other=0.0
                )
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            acc = acc * tl.load(scale_ptr + widx)
            if ADD:
                acc = acc + tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        elif not ADD:
            tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=out_mask)


def _fast_tiles(max_len: int, N: int, dtype: torch.dtype) -> tuple[int, int, int]:
    bm = 16 if max_len <= 16 else (32 if max_len <= 32 else 64)
    bn = 16 if N <= 16 else (32 if N <= 32 else 64)
    bk = 32 if dtype == torch.float32 else 64
    return bm, bn, bk


def sgmv(
    x_M_K: torch.Tensor,
    w_A_N_K: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_adapter: torch.Tensor,
    scale_A: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    max_len: int | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """`y[s:s+len] = scale[w] * x[s:s+len] @ w_A_N_K[w]^T` for every segment (start, len, w); w = -1 → 0.

    With `out` given, the result is added into `out` in place (rows of w = -1 segments keep their value).
    `max_len` (the longest segment) sizes the grid; pass it to avoid reading `seg_len` back from the device.
    """
    M, K = x_M_K.shape
    n_adapters, N, K2 = w_A_N_K.shape
    if K != K2:
        raise ValueError(f"sgmv: x has {K} features but the weights take {K2}")
    if not (seg_start.shape == seg_len.shape == seg_adapter.shape) or seg_start.dim() != 1:
        raise ValueError("sgmv: seg_start, seg_len and seg_adapter must be 1-d and the same length")
    scale = scale_A if scale_A is not None else torch.ones(n_adapters, device=x_M_K.device)
    y = out if out is not None else torch.empty(M, N, device=x_M_K.device, dtype=x_M_K.dtype)
    n_seg = int(seg_start.shape[0])
    if n_seg == 0 or M == 0 or N == 0:
        return y
    longest = max_len if max_len is not None else int(seg_len.max())
    bm, bn, bk = (
        _INVARIANT_TILES.get(x_M_K.dtype, _INVARIANT_TILES[torch.float32])
        if invariant
        else _fast_tiles(longest, N, x_M_K.dtype)
    )
    grid = (n_seg, triton.cdiv(longest, bm), triton.cdiv(N, bn))
    _launch(_sgmv_kernel, grid)(
        x_M_K,
        w_A_N_K,
        y,
        seg_start.to(torch.int32),
        seg_len.to(torch.int32),
        seg_adapter.to(torch.int32),
        scale.to(torch.float32),
        N,
        K,
        x_M_K.stride(0),
        x_M_K.stride(1),
        w_A_N_K.stride(0),
        w_A_N_K.stride(1),
        w_A_N_K.stride(2),
        y.stride(0),
        y.stride(1),
        ADD=out is not None,
        IEEE=x_M_K.dtype == torch.float32,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return y


def lora_sgmv(
    x_M_K: torch.Tensor,
    a_A_R_K: torch.Tensor,
    b_A_N_R: torch.Tensor,
    scale_A: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    base_M_N: torch.Tensor | None = None,
    max_len: int | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """The LoRA delta `scale_w * (x A_w^T) B_w^T` of every segment: shrink then expand, two launches.

    Adapters of different ranks are stacked zero-padded to the largest rank (zero columns add exact zeros).
    With `base_M_N` the delta is added into it in place and it is returned.
    """
    h = sgmv(x_M_K, a_A_R_K, seg_start, seg_len, seg_adapter, max_len=max_len, invariant=invariant)
    return sgmv(
        h,
        b_A_N_R,
        seg_start,
        seg_len,
        seg_adapter,
        scale_A,
        out=base_M_N,
        max_len=max_len,
        invariant=invariant,
    )


def bgmv(
    x_M_K: torch.Tensor,
    a_A_R_K: torch.Tensor,
    b_A_N_R: torch.Tensor,
    scale_A: torch.Tensor,
    adapter_M: torch.Tensor,
    *,
    base_M_N: torch.Tensor | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """Decode-style LoRA: row i uses adapter `adapter_M[i]` (-1 = none), rows in any order."""
    M = x_M_K.shape[0]
    starts = torch.arange(M, device=x_M_K.device, dtype=torch.int32)
    ones = torch.ones(M, device=x_M_K.device, dtype=torch.int32)
    return lora_sgmv(
        x_M_K,
        a_A_R_K,
        b_A_N_R,
        scale_A,
        starts,
        ones,
        adapter_M,
        base_M_N=base_M_N,
        max_len=1,
        invariant=invariant,
    )


def stack_padded(mats: list[torch.Tensor], rank_dim: int) -> torch.Tensor:
    """Stack adapters' A `(r, K)` (rank_dim=0) or B `(N, r)` (rank_dim=1) zero-padded to the largest rank."""
    r_max = max(int(m.shape[rank_dim]) for m in mats)
    out = []
    for m in mats:
        pad = r_max - int(m.shape[rank_dim])
        if pad:
            shape = list(m.shape)
            shape[rank_dim] = pad
            m = torch.cat([m, m.new_zeros(shape)], dim=rank_dim)
        out.append(m)
    return torch.stack(out)
