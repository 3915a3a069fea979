"""AdamW for one adapter, with Tinker's `AdamParams` and optional global grad-norm clipping.

The update follows torch.optim.AdamW's single-tensor path operation for operation (decoupled weight decay
`p -= lr * wd * p`, bias-corrected moments), and clipping follows `torch.nn.utils.clip_grad_norm_`, so a
step equals what the PyTorch optimizer would do on the same parameters and gradients.
"""

from __future__ import annotations

import torch

from treadle.lora.adapter import AdamState
from treadle.lora.config import AdamParams


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale grads in place so their global norm is at most `max_norm` (same formula as torch)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))


@torch.no_grad()
def adamw_step(
    named_params: list[tuple[str, torch.Tensor]], state: dict[str, AdamState], hp: AdamParams
) -> dict[str, float]:
    """One AdamW step over the parameters that hold a gradient; the others (and their state) are skipped,
    as torch.optim does for `grad is None`. Returns metrics keyed `name:reduction`."""
    with_grad = [(n, p) for n, p in named_params if p.grad is not None]
    grads = [p.grad for _, p in with_grad if p.grad is not None]
    total_norm = global_grad_norm(grads)
    if hp.grad_clip_norm > 0 and grads:
        clip_grads_(grads, hp.grad_clip_norm, total_norm)
    lr, wd, b1, b2 = hp.learning_rate, hp.weight_decay, hp.beta1, hp.beta2
    for name, p in with_grad:
        g = p.grad
        assert g is not None
        st = state.get(name)
        if st is None:
            st = state[name] = AdamState(torch.zeros_like(p), torch.zeros_like(p))
        st.step += 1
        p.mul_(1 - lr * wd)
        st.exp_avg.lerp_(g, 1 - b1)
        st.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1**st.step)
        bias_correction2_sqrt = (1 - b2**st.step) ** 0.5
        denom = (st.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(hp.eps)
        p.addcdiv_(st.exp_avg, denom, value=-step_size)
    return {"grad_norm:mean": float(total_norm), "lr:mean": float(lr)}
