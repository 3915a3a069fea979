"""The numerics seam: every reduction the models, LoRA, losses and sampler perform goes through an `Ops`.

Two implementations exist behind this one interface: `fast` (PyTorch's best kernels) and
`batch_invariant` (fixed reduction orders, so a row's result never depends on its batch-mates).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Ops(Protocol):
    name: str

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x[..., in] @ weight[out, in].T (+ bias)."""
        ...

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batched matmul with torch.matmul broadcasting semantics."""
        ...

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x.dtype."""
        ...

    def attention(
        self,
        q_B_H_T_d: torch.Tensor,
        k_B_H_S_d: torch.Tensor,
        v_B_H_S_d: torch.Tensor,
        mask_B_T_S: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """softmax(q k^T * scale, masked) v. `mask_B_T_S` is bool, True = may attend.

        k/v have the same number of heads as q (GQA is expanded by the caller). Every query row must
        be allowed at least one key.
        """
        ...

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(x), elementwise. In the op set because vectorised CPU kernels can round an element
        differently depending on where it falls in memory, which breaks batch invariance."""
        ...

    def softmax(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor: ...

    def log_softmax(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor: ...

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over one dim (used for reductions outside the kernels above, e.g. MoE combine)."""
        ...
