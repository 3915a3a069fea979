"""Creating a custom loss: decode the upload, then dry-run it once on small inputs of the declared ranks, so a
graph that cannot run at all (wrong arity, a shape error, a non-scalar loss) is refused at `create_custom_loss`
rather than at its first forward_backward."""

from __future__ import annotations

import torch

from treadle.engine.custom_loss.graph import decode_graph
from treadle.engine.custom_loss.loss import CustomLoss
from treadle.errors import UserError

_DRY_T, _DRY_K = 5, 3


def build(name: object, inputs: object, graph: object) -> CustomLoss:
    loss = CustomLoss(decode_graph(name, inputs, graph))
    dry_run(loss)
    return loss


def dry_run(loss: CustomLoss) -> None:
    gen = torch.Generator().manual_seed(0)
    values: dict[str, torch.Tensor] = {}
    for x in loss.graph.inputs:
        shape = [(), [_DRY_T], [_DRY_T, _DRY_K]][x.rank]
        values[x.name] = torch.rand(shape, generator=gen, dtype=torch.float32)
    lp = (-values.pop("logprobs") - 0.01).requires_grad_(True)
    try:
        out = loss.compute(lp, values)
        if out.loss.requires_grad:
            out.loss.backward()
    except UserError as e:
        raise UserError(
            f"graph: running it on sample inputs of the declared ranks failed: {e.message}", field="graph"
        ) from None
    except RuntimeError as e:
        raise UserError(f"graph: its backward pass failed on sample inputs: {e}", field="graph") from None
