"""One autograd Function that adds every segment's LoRA delta into a projection's output, with a hand-written
backward.

Forward: for each segment (a run of rows of one adapter, or a row index list when rows are not grouped)
`y[rows] += scale * (x[rows] A^T) B^T`, written into `y` in place (fast mode: one `addmm_` per segment, no
delta tensor at all; batch-invariant mode: the delta through the invariant `ops.linear`, then added, so a row
stays bitwise equal to the row computed alone).

Backward: `y`'s gradient passes through untouched (no copy), and per segment, with `g = grad_y[rows]` and
the saved `h = x[rows] A^T`: `dB = scale g^T h`, `dh = scale g B`, `dA = dh^T x[rows]`, `dx[rows] = dh A`.
Autograd through in-place adds into views would instead clone the whole output gradient once per segment
(`CopySlices`), which on the unembedding (tokens × 49k vocab) dominated the fused step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from treadle import ops


@dataclasses.dataclass(frozen=True)
class SegmentRows:
    """Rows of one adapter: a contiguous run `start:start+length` or, when `index` is set, those rows."""

    start: int
    length: int
    index: torch.Tensor | None
    scale: float


def _rows(t: torch.Tensor, seg: SegmentRows) -> torch.Tensor:
    return t.narrow(0, seg.start, seg.length) if seg.index is None else t.index_select(0, seg.index)


class _GroupedLoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        segments: list[SegmentRows],
        invariant: bool,
        *ab: torch.Tensor,
    ) -> torch.Tensor:
        out_f, in_f = y.shape[-1], x.shape[-1]
        y2, x2_shape = y.view(y.shape[0], -1, out_f), (-1, in_f)
        hs: list[torch.Tensor] = []
        o = ops.current()
        for i, seg in enumerate(segments):
            a, b = ab[2 * i].to(x.dtype), ab[2 * i + 1].to(x.dtype)
            xs = _rows(x, seg).reshape(x2_shape)
            h = o.linear(xs, a)
            hs.append(h)
            if invariant:
                d = (o.linear(h, b) * seg.scale).view(-1, y2.shape[1], out_f)
                if seg.index is None:
                    y2.narrow(0, seg.start, seg.length).add_(d)
                else:
                    y2.index_add_(0, seg.index, d)
            elif seg.index is None:
                ys = y2.narrow(0, seg.start, seg.length).view(-1, out_f)
                ys.addmm_(h, b.t(), alpha=seg.scale)
            else:
                d = torch.mm(h, b.t()).mul_(seg.scale).view(-1, y2.shape[1], out_f)
                y2.index_add_(0, seg.index, d)
        ctx.mark_dirty(y)
        ctx.segments = segments
        ctx.save_for_backward(x, *ab, *hs)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        segments: list[SegmentRows] = ctx.segments
        n = len(segments)
        saved = ctx.saved_tensors
        x, ab, hs = saved[0], saved[1 : 1 + 2 * n], saved[1 + 2 * n :]
        out_f, in_f = grad_y.shape[-1], x.shape[-1]
        need_x = ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grads_ab: list[torch.Tensor | None] = [None] * (2 * n)
        for i, seg in enumerate(segments):
            need_a, need_b = ctx.needs_input_grad[4 + 2 * i], ctx.needs_input_grad[5 + 2 * i]
            if not (need_x or need_a or need_b):
                continue
            a, b, h = ab[2 * i].to(x.dtype), ab[2 * i + 1].to(x.dtype), hs[i]
            g = _rows(grad_y, seg).reshape(-1, out_f)
            if need_b:
                grads_ab[2 * i + 1] = torch.mm(g.t(), h).mul_(seg.scale).to(ab[2 * i + 1].dtype)
            dh = torch.mm(g, b).mul_(seg.scale)
            xs = _rows(x, seg).reshape(-1, in_f)
            if need_a:
                grads_ab[2 * i] = torch.mm(dh.t(), xs).to(ab[2 * i].dtype)
            if grad_x is not None:
                dx = torch.mm(dh, a).view(-1, *x.shape[1:])
                if seg.index is None:
                    grad_x.narrow(0, seg.start, seg.length).add_(dx)
                else:
                    grad_x.index_add_(0, seg.index, dx)
        return grad_y, grad_x, None, None, *grads_ab


def grouped_lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    segments: list[SegmentRows],
    weights: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """`y + Σ_segments delta`, in place into `y` (a projection's fresh output; dim 0 = rows of x and y)."""
    if not y.is_contiguous():
        y = y.contiguous()
    flat = [t for pair in weights for t in pair]
    invariant = ops.current().name == "batch_invariant"
    return _GroupedLoraAdd.apply(y, x, segments, invariant, *flat)  # type: ignore[no-any-return]
