"""The `batch_invariant` implementation: a row's result is bitwise independent of its batch-mates.

CUDA tensors go through the Triton kernels in `triton_kernels.py`; everything else (CPU) goes through the
plain-torch fixed-order ops in `cpu_invariant.py`. Forward passes are invariant; backward passes are exact
math (autograd through the torch ops on CPU; on CUDA, autograd Functions whose backward differentiates the
`fast` formula at the saved inputs), which is all the trainer needs: it backpropagates, it never compares
gradients across batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from treadle.errors import UserError
from treadle.ops import cpu_invariant as cpu
from treadle.ops.fast import FastOps

_fast = FastOps()


def _use_triton(*tensors: torch.Tensor) -> bool:
    return any(t.is_cuda for t in tensors)


def _triton() -> Any:
    try:
        from treadle.ops import triton_kernels
    except ImportError as e:  # pragma: no cover - triton ships with CUDA builds of torch
        raise UserError(
            "ops mode: batch_invariant on CUDA needs the `triton` package; install it or use mode 'fast'",
            field="mode",
        ) from e
    return triton_kernels


class _KernelWithReferenceGrad(torch.autograd.Function):
    """Forward with an invariant kernel, backward by differentiating the reference formula at the inputs."""

    @staticmethod
    def forward(
        ctx: Any, kernel: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor], *args: Any
    ):
        ctx.reference = reference
        ctx.tensor_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_idx])
        return kernel(*args)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        args = list(ctx.args)
        leaves: list[torch.Tensor] = []
        for i, t in zip(ctx.tensor_idx, saved, strict=True):
            leaf = t.detach().requires_grad_(ctx.needs_input_grad[2 + i] and t.is_floating_point())
            args[i] = leaf
            leaves.append(leaf)
        wanted = [x for x in leaves if x.requires_grad]
        with torch.enable_grad():
            out = ctx.reference(*args)
            got = torch.autograd.grad(out, wanted, grads[0], allow_unused=True) if wanted else ()
        it = iter(got)
        per_tensor = [next(it) if x.requires_grad else None for x in leaves]
        result: list[torch.Tensor | None] = [None] * (2 + len(args))
        for i, g in zip(ctx.tensor_idx, per_tensor, strict=True):
            result[2 + i] = g
        return tuple(result)


def with_reference_grad(
    kernel: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor], *args: Any
) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )
    if not needs_grad:
        return kernel(*args)
    return _KernelWithReferenceGrad.apply(kernel, reference, *args)  # type: ignore[no-any-return]


def _lastdim(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int) -> torch.Tensor:
    return fn(x.movedim(dim, -1).contiguous()).movedim(-1, dim)


class BatchInvariantOps:
    name = "batch_invariant"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if _use_triton(x, weight):
            return with_reference_grad(_triton().linear, _fast.linear, x, weight, bias)
        return cpu.linear(x, weight, bias)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if _use_triton(a, b):
            return with_reference_grad(_triton_matmul, _fast.matmul, a, b)
        return cpu.matmul(a, b)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _use_triton(x, weight):
            return with_reference_grad(_triton().rmsnorm, _fast.rmsnorm, x, weight, eps)
        return cpu.rmsnorm(x, weight, eps)

    def attention(
        self,
        q_B_H_T_d: torch.Tensor,
        k_B_H_S_d: torch.Tensor,
        v_B_H_S_d: torch.Tensor,
        mask_B_T_S: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        args = (q_B_H_T_d, k_B_H_S_d, v_B_H_S_d, mask_B_T_S, scale)
        if _use_triton(q_B_H_T_d):
            return with_reference_grad(_triton().attention, _reference_attention, *args)
        return cpu.attention(*args)

    def softmax(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if _use_triton(x):
            kernels = _triton()
            return with_reference_grad(
                lambda t: _lastdim(lambda u: kernels.softmax_lastdim(u, False), t, dim), _softmax(dim), x
            )
        return cpu.softmax(x, dim)

    def log_softmax(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if _use_triton(x):
            kernels = _triton()
            return with_reference_grad(
                lambda t: _lastdim(lambda u: kernels.softmax_lastdim(u, True), t, dim), _log_softmax(dim), x
            )
        return cpu.log_softmax(x, dim)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP's activation, invariant on CPU (see `cpu_invariant`)."""
        if _use_triton(x):
            return torch.nn.functional.silu(x)  # CUDA elementwise kernels compute every element alike
        return cpu.silu(x)

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if _use_triton(x):
            kernels = _triton()
            return with_reference_grad(
                lambda t: kernels.sum_lastdim(t.movedim(dim, -1)), lambda t: t.sum(dim), x
            )
        return cpu.sum(x, dim)


def _softmax(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.softmax(t, dim)


def _log_softmax(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.log_softmax(t, dim)


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_B_T_S: torch.Tensor, scale: float
) -> torch.Tensor:
    """The attention formula in differentiable torch (used for the CUDA backward only)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask_B_T_S[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v.float()).to(q.dtype)


def _triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    kernels = _triton()
    if a.dim() == 1:
        return _triton_matmul(a[None], b).squeeze(-2)
    if b.dim() == 1:
        return _triton_matmul(a, b[:, None]).squeeze(-1)
    if b.dim() == 2:
        y = kernels.bmm(a.reshape(-1, a.shape[-1])[None], b[None])[0]
        return y.reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return kernels.bmm(a3, b3).reshape(*batch, a.shape[-2], b.shape[-1])
