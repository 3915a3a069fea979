"""The `fast` implementation: PyTorch's best kernels (BLAS on CPU, SDPA/flash attention on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FastOps:
    name = "fast"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * y).to(x.dtype)

    def attention(
        self,
        q_B_H_T_d: torch.Tensor,
        k_B_H_S_d: torch.Tensor,
        v_B_H_S_d: torch.Tensor,
        mask_B_T_S: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_B_H_T_d, k_B_H_S_d, v_B_H_S_d, attn_mask=mask_B_T_S[:, None, :, :], scale=scale
        )

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def softmax(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.softmax(x, dim=dim)

    def log_softmax(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.log_softmax(x, dim=dim)

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.sum(dim=dim)
