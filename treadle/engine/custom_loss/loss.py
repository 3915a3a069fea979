"""Run a decoded custom loss on one datum: bind logprobs and the declared `loss_fn_inputs`, interpret the nodes
through the allow-list only, and bound what each node may produce (tensor size, Python numbers).

Per datum, as the SDK's client-side `run_loss_handle` does: the loss is a scalar, the datums' losses are summed
and each `custom/<name>:sum|mean` metric is reduced over datums by its suffix (`losses.merge_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from treadle.engine.custom_loss import allowed
from treadle.engine.custom_loss.graph import Graph, Node, Ref
from treadle.engine.losses import LossOutput
from treadle.errors import UserError, require

# The largest tensor one node may produce: a floor for tiny inputs, else a multiple of the datum's inputs.
_MIN_ELEMENTS = 1 << 20
_ELEMENTS_PER_INPUT = 16
_MAX_EXPONENT = 1024  # a Python-number power (tensors are bounded by their size instead)
_ARITHMETIC = {
    "operator.add", "operator.sub", "operator.mul", "operator.truediv", "operator.floordiv", "operator.mod",
    "operator.pow",
}  # fmt: skip
# Reading a tensor as a Python number is allowed only where the value stays a shape or count.
_SCALAR_METHODS = {"dim", "numel", "size"}


class CustomLoss:
    """A checked graph, runnable per datum (see `run`)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.graph.inputs[1:])

    def validate(self, inputs: Mapping[str, torch.Tensor], n_tokens: int, vocab_size: int) -> None:
        """This datum has every declared input at its declared rank, T rows each, and valid targets."""
        targets = inputs.get("target_tokens")
        require(
            targets is not None, "loss_fn_inputs.target_tokens", f"is required by custom loss {self.name!r}"
        )
        assert targets is not None
        lp_rank = self.graph.inputs[0].rank
        require(
            targets.dim() == lp_rank,
            "loss_fn_inputs.target_tokens",
            f"custom loss {self.name!r} declared logprobs with rank {lp_rank}, so target_tokens must have rank "
            f"{lp_rank}, got shape {list(targets.shape)}",
        )
        require(
            int(targets.shape[0]) == n_tokens,
            "loss_fn_inputs.target_tokens",
            f"length {int(targets.shape[0])} must equal the model_input length {n_tokens}",
        )
        require(
            not targets.is_floating_point() or bool((targets == targets.round()).all()),
            "loss_fn_inputs.target_tokens",
            "must be integer token ids",
        )
        if targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            require(
                lo >= 0 and hi < vocab_size,
                "loss_fn_inputs.target_tokens",
                f"token ids must be in 0..{vocab_size - 1}, got {lo if lo < 0 else hi}",
            )
        for x in self.graph.inputs[1:]:
            field = f"loss_fn_inputs.{x.name}"
            t = inputs.get(x.name)
            require(t is not None, field, f"is required by custom loss {self.name!r}")
            assert t is not None
            if x.rank == 0:
                require(t.numel() == 1, field, f"is declared a scalar (rank 0), got shape {list(t.shape)}")
            else:
                require(
                    t.dim() == x.rank and int(t.shape[0]) == n_tokens,
                    field,
                    f"is declared with rank {x.rank} ({'[T]' if x.rank == 1 else '[T, K]'}, T = {n_tokens}), "
                    f"got shape {list(t.shape)}",
                )
            require(
                t.dtype != torch.bool and not t.is_complex(), field, "must be a real-valued numeric tensor"
            )
            if t.is_floating_point():
                require(bool(torch.isfinite(t).all()), field, "must contain only finite numbers")
        # Run it once on this datum's shapes (stand-in logprobs, no grad), so a shape error fails this request
        # here, before it shares a model pass with other requests.
        stand_in = torch.full(tuple(targets.shape), -1.0)
        with torch.no_grad():
            self.compute(stand_in, {k: inputs[k] for k in self.input_names})

    def compute(self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> LossOutput:
        """One datum's loss (scalar, differentiable in `logprobs`) and metrics; inputs are assumed validated."""
        values = [logprobs]
        for x in self.graph.inputs[1:]:
            t = inputs[x.name]
            t = t.to(logprobs.dtype) if t.is_floating_point() else t
            values.append(t.reshape(()) if x.rank == 0 else t)
        loss, metrics = run(self.graph, values)
        return LossOutput(
            loss=loss,
            elementwise_loss=None,
            metrics={"loss:sum": float(loss.detach()), **metrics},
        )


def run(graph: Graph, values: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Interpret the graph on one datum's input tensors (logprobs first)."""
    limit = max(_MIN_ELEMENTS, _ELEMENTS_PER_INPUT * sum(int(v.numel()) for v in values))
    env: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = values[len(env)]
        elif node.op != "output":
            env[node.name] = _call(graph.name, node, env, limit)
    loss = env[graph.loss.name]
    where = f"custom loss {graph.name!r}"
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserError(f"{where}: must return a scalar floating-point loss, got {shape}", field="loss_fn")
    metrics: dict[str, float] = {}
    for key, ref in graph.metrics.items():
        v = env[ref.name]
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise UserError(f"{where}: metric {key!r} must be a scalar tensor", field="loss_fn")
        metrics[key] = float(v.detach().reshape(()))
    return loss, metrics


def _resolve(v: Any, env: dict[str, Any]) -> Any:
    if isinstance(v, Ref):
        return env[v.name]
    if isinstance(v, list):
        return [_resolve(x, env) for x in v]
    if isinstance(v, tuple):
        return tuple(_resolve(x, env) for x in v)
    if isinstance(v, dict):
        return {k: _resolve(x, env) for k, x in v.items()}
    if isinstance(v, slice):
        return slice(_resolve(v.start, env), _resolve(v.stop, env), _resolve(v.step, env))
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float)  # bools included: fx passes them as flags


def _call(loss_name: str, node: Node, env: dict[str, Any], limit: int) -> Any:
    where = f"custom loss {loss_name!r} node {node.name!r} ({node.target})"
    args = [_resolve(a, env) for a in node.args]
    kwargs = {k: _resolve(v, env) for k, v in node.kwargs.items()}
    if node.op == "call_function" and node.target in ("getattr", "builtins.getattr"):
        obj = args[0]
        if not isinstance(obj, torch.Tensor):
            raise UserError(f"{where}: attributes may be read only from tensors", field="loss_fn")
        out: Any = getattr(obj, args[1])  # args[1] is on allowed.ATTRIBUTES (checked when decoded)
        return tuple(out) if isinstance(out, torch.Size) else out
    if node.op == "call_function":
        fn = allowed.FUNCTIONS[node.target]
        if node.target in _ARITHMETIC:
            _check_arithmetic(where, node.target, args)
        if node.target == "operator.getitem" and not isinstance(args[0], torch.Tensor | tuple | list):
            raise UserError(f"{where}: indexing works on tensors and shapes only", field="loss_fn")
    else:
        self_ = args[0]
        if not isinstance(self_, torch.Tensor):
            raise UserError(f"{where}: method {node.target!r} must be called on a tensor", field="loss_fn")
        fn = getattr(torch.Tensor, node.target)  # node.target is on allowed.METHODS (checked when decoded)
    _check_broadcast(where, [*args, *kwargs.values()], limit)
    try:
        out = fn(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise UserError(f"{where} failed: {e}", field="loss_fn") from None
    return _bounded(where, out, limit)


def _check_broadcast(where: str, operands: list[Any], limit: int) -> None:
    """Refuse before computing an elementwise op whose broadcast result would pass the limit ([T, 1] * [1, T])."""
    shapes = [tuple(a.shape) for a in operands if isinstance(a, torch.Tensor)]
    if len(shapes) < 2:
        return
    try:
        n = torch.broadcast_shapes(*shapes).numel()
    except RuntimeError:
        return  # not an elementwise op over these shapes (e.g. gather): the op itself decides
    if n > limit:
        raise UserError(
            f"{where}: would broadcast to {n} elements; a custom loss node is limited to {limit}",
            field="loss_fn",
        )


def _check_arithmetic(where: str, target: str, args: list[Any]) -> None:
    # Python's `*` on a list repeats it and `**` on big ints never ends: only tensors and numbers are operands.
    for a in args:
        if not (isinstance(a, torch.Tensor) or _is_number(a)):
            raise UserError(
                f"{where}: operands must be tensors or numbers, got {type(a).__name__}", field="loss_fn"
            )
    if target == "operator.pow" and not any(isinstance(a, torch.Tensor) for a in args):
        exponent = args[1]
        if abs(exponent) > _MAX_EXPONENT:
            raise UserError(f"{where}: a number's exponent is limited to ±{_MAX_EXPONENT}", field="loss_fn")
        if isinstance(args[0], int) and isinstance(exponent, int) and abs(args[0]) > 2**20:
            raise UserError(f"{where}: integer powers are limited to bases up to 2**20", field="loss_fn")


def _bounded(where: str, out: Any, limit: int) -> Any:
    items = out if isinstance(out, tuple | list) else (out,)
    for x in items:
        if isinstance(x, torch.Tensor) and x.numel() > limit:
            raise UserError(
                f"{where}: produced a tensor of {x.numel()} elements; a custom loss node is limited to {limit}",
                field="loss_fn",
            )
        if isinstance(x, int) and not isinstance(x, bool) and abs(x) > 2**53:
            raise UserError(f"{where}: produced an integer out of range (|x| ≤ 2**53)", field="loss_fn")
    return out
