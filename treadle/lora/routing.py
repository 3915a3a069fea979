"""The grouped `LoraHook`: a batch's rows grouped by adapter into contiguous segments, once per batch.

The hook sorts the batch rows by adapter once (stable: rows keep their order inside a segment). When the
caller already passes rows grouped (the trainer does), the order is the identity and every projection computes
each adapter's delta `scale_a * ((x[s:e] @ A_a^T) @ B_a^T)` on a contiguous slice of its input (a view, no
copy) and the segments are concatenated once into the delta. Otherwise (the sampler's decode batches, MoE
expert token lists) the input is gathered into segment order once per projection and the delta scattered
back once — two copies per projection however many adapters the batch holds, instead of one full-size
copy per adapter.

All arithmetic goes through `treadle.ops.current().linear` on contiguous rows, so the batch-invariant mode
keeps a row's delta bitwise equal to the row computed alone (the segment a row sits in only changes which
rows are computed beside it). A row only touches its own adapter's tensors: gradients of row b flow into row
b's adapter alone, and backward is the slices', the concatenation's and the small matmuls' own (no scatter).
"""

from __future__ import annotations

import dataclasses

import torch

from treadle import ops
from treadle.lora.adapter import Adapter, LoraPair
from treadle.lora.grouped_fn import SegmentRows, grouped_lora_add


def lora_delta(pair: LoraPair, scale: float, x: torch.Tensor) -> torch.Tensor:
    """`scale * B (A x)` in x's dtype (the fp32 master weights are cast, differentiably, when x is not fp32)."""
    o = ops.current()
    a, b = pair.a_R_In.to(x.dtype), pair.b_Out_R.to(x.dtype)
    return o.linear(o.linear(x, a), b) * scale


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows `start:end` (in grouped order) use `adapter` (None = the base model alone)."""

    adapter: Adapter | None
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Grouping:
    """A permutation that makes rows of one adapter contiguous, and the segments it yields."""

    segments: tuple[Segment, ...]
    perm: torch.Tensor | None  # grouped position -> original row; None when rows already are grouped
    inverse: torch.Tensor | None  # original row -> grouped position


def group_rows(slots: list[int], adapters: list[Adapter], device: torch.device) -> Grouping:
    """Segments for rows whose adapter is `adapters[slots[i]]` (slot -1 = no adapter), in first-seen order."""
    order_of_slot: dict[int, int] = {}
    for s in slots:
        order_of_slot.setdefault(s, len(order_of_slot))
    perm = sorted(range(len(slots)), key=lambda i: order_of_slot[slots[i]])
    segments: list[Segment] = []
    start = 0
    while start < len(perm):
        slot = slots[perm[start]]
        end = start
        while end < len(perm) and slots[perm[end]] == slot:
            end += 1
        segments.append(Segment(adapters[slot] if slot >= 0 else None, start, end))
        start = end
    if perm == list(range(len(slots))):
        return Grouping(tuple(segments), None, None)
    perm_t = torch.tensor(perm, dtype=torch.long, device=device)
    inverse = torch.empty_like(perm_t)
    inverse[perm_t] = torch.arange(len(perm), device=device)
    return Grouping(tuple(segments), perm_t, inverse)


def grouped_delta(grouping: Grouping, key: str, x: torch.Tensor) -> torch.Tensor | None:
    """The LoRA delta of projection `key` for `x` whose dim 0 are the grouped rows (any middle dims)."""
    active = [s for s in grouping.segments if s.adapter is not None and key in s.adapter.weights]
    if not active:
        return None
    n = x.shape[0]
    if len(active) == 1 and active[0].end - active[0].start == n:
        ad = active[0].adapter
        assert ad is not None
        return lora_delta(ad.weights[key], ad.scale, x)  # one adapter serves every row
    xs = x if grouping.perm is None else x.index_select(0, grouping.perm)
    ref = active[0].adapter
    assert ref is not None
    out_features = ref.weights[key].b_Out_R.shape[0]
    parts: list[torch.Tensor] = []
    for seg in grouping.segments:
        rows = xs[seg.start : seg.end]
        ad = seg.adapter
        if ad is None or key not in ad.weights:
            parts.append(x.new_zeros(*rows.shape[:-1], out_features))
        else:
            parts.append(lora_delta(ad.weights[key], ad.scale, rows))
    out = torch.cat(parts, 0)
    return out if grouping.inverse is None else out.index_select(0, grouping.inverse)


def grouped_add(grouping: Grouping, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y + delta`, each segment's delta added into its own rows of y in place (no full-size delta).

    Grouped rows use contiguous runs; otherwise each segment works on its row index list (`index_select` of
    x, `index_add_` into y). One autograd Function does it all, with a backward that passes y's gradient
    through and reads each segment's rows of it once (see `grouped_fn`).
    """
    segments: list[SegmentRows] = []
    weights: list[tuple[torch.Tensor, torch.Tensor]] = []
    for seg in grouping.segments:
        ad = seg.adapter
        if ad is None or key not in ad.weights:
            continue
        index = None if grouping.perm is None else grouping.perm[seg.start : seg.end]
        segments.append(SegmentRows(seg.start, seg.end - seg.start, index, ad.scale))
        pair = ad.weights[key]
        weights.append((pair.a_R_In, pair.b_Out_R))
    if not segments:
        return y
    return grouped_lora_add(y, x, segments, weights)


class GroupedLora:
    """A LoraHook for one batch: `slots[b]` indexes `adapters` (-1 = base model) for batch row b."""

    def __init__(self, adapters: list[Adapter], slots: list[int], device: torch.device):
        self.adapters = adapters
        self.slots = slots
        self.batch_size = len(slots)
        self.device = device
        self.grouping = group_rows(slots, adapters, device)
        self._slot_B = torch.tensor(slots, dtype=torch.long, device=device)

    def add_delta(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y + delta(key, x)` for `x` `(B, T, in)`, computed by adding into `y` (the base projection's fresh
        output, which nothing else holds) in place."""
        return grouped_add(self.grouping, key, x, y)

    def delta(self, key: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        if rows is None:
            return grouped_delta(self.grouping, key, x)
        # token rows (MoE experts): group these tokens by their batch row's adapter
        token_slots = self._slot_B[rows].tolist()
        return grouped_delta(group_rows(token_slots, self.adapters, self.device), key, x)


# The name the rest of treadle has always imported; the grouped hook replaced the per-adapter scatter.
RoutedLora = GroupedLora
