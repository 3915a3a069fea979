"""The per-row `LoraHook`: each batch row goes through its own adapter (or none) in one model pass.

For every distinct adapter among the rows, `delta[rows_of_a] = scale_a * ((x[rows_of_a] @ A_a^T) @ B_a^T)`,
computed with `treadle.ops.current().linear` so the batch-invariant mode covers LoRA too. A row only ever
touches its own adapter's tensors, so gradients of row b flow into row b's adapter alone.
"""

from __future__ import annotations

import torch

from treadle import ops
from treadle.lora.adapter import Adapter, LoraPair


def lora_delta(pair: LoraPair, scale: float, x: torch.Tensor) -> torch.Tensor:
    """`scale * B (A x)` in x's dtype (the fp32 master weights are cast, differentiably, when x is not fp32)."""
    o = ops.current()
    a, b = pair.a_R_In.to(x.dtype), pair.b_Out_R.to(x.dtype)
    return o.linear(o.linear(x, a), b) * scale


class RoutedLora:
    """A LoraHook for one batch. `groups[i]` is an adapter and the batch rows `(n,)` that use it."""

    def __init__(self, groups: list[tuple[Adapter, torch.Tensor]], batch_size: int, device: torch.device):
        self.groups = groups
        self.batch_size = batch_size
        slot_B = torch.full((batch_size,), -1, dtype=torch.long)
        for i, (_, rows) in enumerate(groups):
            slot_B[rows.cpu()] = i
        self.slot_B = slot_B.to(device)

    def delta(self, key: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        active = [(i, ad, idx) for i, (ad, idx) in enumerate(self.groups) if key in ad.weights]
        if not active:
            return None
        if len(active) == 1 and active[0][2].numel() == self.batch_size:
            # one adapter serves every row: no gather/scatter needed
            ad = active[0][1]
            return lora_delta(ad.weights[key], ad.scale, x)
        if rows is None:
            selections = [(ad, idx) for _, ad, idx in active]
        else:
            slot_N = self.slot_B[rows]
            selections = [(ad, torch.nonzero(slot_N == i).squeeze(1)) for i, ad, _ in active]
            selections = [(ad, sel) for ad, sel in selections if sel.numel()]
            if not selections:
                return None
        out_features = selections[0][0].weights[key].b_Out_R.shape[0]
        out = x.new_zeros(*x.shape[:-1], out_features)
        for ad, sel in selections:
            # rows outside `sel` keep 0; index_copy is out-of-place, so gradients reach only `sel`'s adapter
            out = out.index_copy(0, sel, lora_delta(ad.weights[key], ad.scale, x.index_select(0, sel)))
        return out
