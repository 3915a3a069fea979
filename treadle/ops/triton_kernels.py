"""Batch-invariant Triton kernels: the GPU half of `BatchInvariantOps` (forward passes only).

Every kernel fixes its reduction order by construction, independent of how many rows are in the batch and
where a row sits in it (Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025):

- matmul: one tile configuration per dtype, one program per output tile, the K loop runs in full inside the
  program (no split-K, no stream-K), so an output element's sum order depends only on K.
- rmsnorm / softmax / log_softmax / row sum: one program per row, lane-wise accumulation over fixed-size
  column blocks, then one fixed in-register tree.
- attention: one program per (batch·head, block of queries); keys are walked in fixed-size blocks aligned to
  absolute key position 0 with an online-softmax merge. A fully masked trailing block leaves the running max
  as it is (alpha = exp(0) = 1) and adds exact zeros, so padding, a longer batch-mate or a longer prefill
  change no bit of a row.

The kernels also run under `TRITON_INTERPRET=1` on CPU tensors (that is how the default test suite checks
them); on CUDA they need no interpreter. Backward passes are not here: `batch_invariant.py` wraps these in
autograd Functions whose backward is the exact math in plain torch.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# One configuration per dtype, never chosen from the shape: that is the whole point.
_MM_TILES: dict[torch.dtype, tuple[int, int, int]] = {
    torch.float32: (32, 32, 32),
    torch.bfloat16: (64, 64, 64),
    torch.float16: (64, 64, 64),
}
ROW_BLOCK = 1024  # column block for the row kernels
ATTN_BLOCK_M = 16  # queries per attention program
ATTN_BLOCK_N = 64  # the fixed KV split size, aligned to absolute key positions


def _launch(kernel: Any, grid: tuple[int, ...]) -> Any:
    """`kernel[grid]`, typed loosely: pyright cannot see that Triton turns ints into `tl.constexpr`."""
    return kernel[grid]


@triton.jit
def _mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_cb,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + pid_b * stride_ab
    b_base = b_ptr + pid_b * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            a_base + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
            mask=(offs_m[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_base + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(kk[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c = c_ptr + pid_b * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def bmm(a_B_M_K: torch.Tensor, b_B_K_N: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """Batched `a @ b` (+ bias) with a fixed tile configuration; the batch dim of either may be 1 (broadcast)."""
    Ba, M, K = a_B_M_K.shape
    Bb, K2, N = b_B_K_N.shape
    if K != K2 or (Ba != Bb and 1 not in (Ba, Bb)):
        raise ValueError(f"bmm: shapes {tuple(a_B_M_K.shape)} and {tuple(b_B_K_N.shape)} do not match")
    Bt = max(Ba, Bb)
    c = torch.empty(Bt, M, N, device=a_B_M_K.device, dtype=a_B_M_K.dtype)
    if c.numel() == 0:
        return c
    bm, bn, bk = _MM_TILES.get(a_B_M_K.dtype, _MM_TILES[torch.float32])
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), Bt)
    _launch(_mm_kernel, grid)(
        a_B_M_K,
        b_B_K_N,
        c,
        bias_N if bias_N is not None else c,
        M,
        N,
        K,
        a_B_M_K.stride(0) if Ba > 1 else 0,
        a_B_M_K.stride(1),
        a_B_M_K.stride(2),
        b_B_K_N.stride(0) if Bb > 1 else 0,
        b_B_K_N.stride(1),
        b_B_K_N.stride(2),
        c.stride(0),
        c.stride(1),
        c.stride(2),
        HAS_BIAS=bias_N is not None,
        IEEE=a_B_M_K.dtype == torch.float32,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return c


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., in] @ weight[out, in].T (+ bias)."""
    x_M_K = x.reshape(-1, x.shape[-1])
    y = bmm(x_M_K[None], weight.t()[None], bias)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=c0 + offs < N, other=0.0).to(tl.float32)
        acc += x * x
    inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    for c0 in range(0, N, BLOCK):
        m = c0 + offs < N
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c0 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + c0 + offs, (w * (x * inv)).to(y_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_M_N = x.reshape(-1, x.shape[-1]).contiguous()
    M, N = x_M_N.shape
    y = torch.empty_like(x_M_N)
    if M:
        _launch(_rmsnorm_kernel, (M,))(
            x_M_N, weight.contiguous(), y, N, x_M_N.stride(0), y.stride(0), eps, BLOCK=ROW_BLOCK
        )
    return y.reshape(x.shape)


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, N, stride_x, stride_y, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=c0 + offs < N, other=float("-inf"))
        mx = tl.maximum(mx, x.to(tl.float32))
    m = tl.max(mx, axis=0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=c0 + offs < N, other=float("-inf"))
        acc += tl.exp(x.to(tl.float32) - m)
    total = tl.sum(acc, axis=0)
    log_total = tl.log(total)
    for c0 in range(0, N, BLOCK):
        msk = c0 + offs < N
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=msk, other=0.0).to(tl.float32)
        if LOG:
            y = x - m - log_total
        else:
            y = tl.exp(x - m) / total
        tl.store(y_ptr + row * stride_y + c0 + offs, y.to(y_ptr.dtype.element_ty), mask=msk)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def softmax_lastdim(x: torch.Tensor, log: bool) -> torch.Tensor:
    x_M_N = _rows(x)
    y = torch.empty_like(x_M_N)
    if x_M_N.numel():
        M, N = x_M_N.shape
        _launch(_softmax_kernel, (M,))(x_M_N, y, N, x_M_N.stride(0), y.stride(0), LOG=log, BLOCK=ROW_BLOCK)
    return y.reshape(x.shape)


@triton.jit
def _rowsum_kernel(x_ptr, y_ptr, N, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        acc += tl.load(x_ptr + row * stride_x + c0 + offs, mask=c0 + offs < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + row, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty))


def sum_lastdim(x: torch.Tensor) -> torch.Tensor:
    x_M_N = _rows(x)
    y = torch.empty(x_M_N.shape[0], device=x.device, dtype=x.dtype)
    if x_M_N.shape[0]:
        _launch(_rowsum_kernel, (x_M_N.shape[0],))(x_M_N, y, x_M_N.shape[1], x_M_N.stride(0), BLOCK=ROW_BLOCK)
    return y.reshape(x.shape[:-1])


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    o_ptr,
    H,
    T,
    S,
    D,
    scale,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    sv_h,
    sv_s,
    sm_b,
    sm_t,
    sm_s,
    so_b,
    so_h,
    so_t,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_N):
        keys = s0 + offs_n
        key_ok = keys < S
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + keys[:, None] * sk_s + offs_d[None, :],
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + keys[:, None] * sv_s + offs_d[None, :],
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        allowed = tl.load(
            mask_ptr + b * sm_b + offs_m[:, None] * sm_t + keys[None, :] * sm_s,
            mask=row_ok[:, None] & key_ok[None, :],
            other=0,
        )
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(allowed != 0, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing allowed so far keeps -inf; use 0 as the shift so exp() gives exact zeros, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def attention(
    q_B_H_T_d: torch.Tensor,
    k_B_H_S_d: torch.Tensor,
    v_B_H_S_d: torch.Tensor,
    mask_B_T_S: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(q kᵀ·scale, masked) v with fixed KV blocks of `ATTN_BLOCK_N` keys from absolute position 0."""
    B, H, T, D = q_B_H_T_d.shape
    S = k_B_H_S_d.shape[2]
    q = q_B_H_T_d.contiguous()
    k = k_B_H_S_d.contiguous()
    v = v_B_H_S_d.contiguous()
    mask = mask_B_T_S.to(torch.int8)
    o = torch.empty_like(q)
    if o.numel() == 0:
        return o
    block_d = max(16, triton.next_power_of_2(D))
    grid = (B * H, triton.cdiv(T, ATTN_BLOCK_M))
    _launch(_attention_kernel, grid)(
        q,
        k,
        v,
        mask,
        o,
        H,
        T,
        S,
        D,
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        mask.stride(0),
        mask.stride(1),
        mask.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        IEEE=q.dtype == torch.float32,
        BLOCK_M=ATTN_BLOCK_M,
        BLOCK_N=ATTN_BLOCK_N,
        BLOCK_D=block_d,
    )
    return o
