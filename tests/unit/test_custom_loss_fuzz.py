"""Fuzz the custom-loss graph decoder: arbitrary JSON, and valid SDK-encoded graphs with one part replaced by
arbitrary JSON, either build into a runnable loss or are refused with a UserError — nothing else escapes."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treadle.engine.custom_loss import build
from treadle.errors import UserError

_NAMES = [
    "logprobs",
    "weights",
    "mul",
    "s",
    "neg",
    "sum",
    "exp",
    "operator.add",
    "torch.exp",
    "getattr",
    "shape",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(_NAMES),
    st.text(max_size=8),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["ref", "tuple", "dict", "slice", "float", "dtype", "device", "x"]),
            inner,
            max_size=2,
        ),
        st.fixed_dictionaries({"ref": st.sampled_from(_NAMES)}),
    ),
    max_leaves=12,
)

BASE: dict[str, Any] = {
    "name": "neg_ll",
    "inputs": [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 1}],
    "graph": {
        "format": 1,
        "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
            {"op": "placeholder", "name": "weights", "target": "weights", "args": [], "kwargs": {}},
            {"op": "call_function", "name": "mul", "target": "operator.mul", "args": [{"ref": "logprobs"}, {"ref": "weights"}], "kwargs": {}},
            {"op": "call_method", "name": "s", "target": "sum", "args": [{"ref": "mul"}], "kwargs": {}},
            {"op": "call_function", "name": "neg", "target": "operator.neg", "args": [{"ref": "s"}], "kwargs": {}},
            {"op": "output", "name": "output", "target": "output", "args": [{"tuple": [{"ref": "neg"}, {"dict": {"custom/nll:sum": {"ref": "neg"}}}]}], "kwargs": {}},
        ],
    },
}  # fmt: skip


def _builds_or_refuses(name: Any, inputs: Any, graph: Any) -> None:
    try:
        loss = build(name, inputs, graph)
    except UserError as e:
        assert e.message and e.field
        return
    # whatever was accepted must run on a datum of its declared shapes, or refuse it cleanly
    lp = torch.full((4,) if loss.graph.inputs[0].rank == 1 else (4, 2), -1.0, requires_grad=True)
    values = {x.name: torch.ones([(), (4,), (4, 2)][x.rank]) for x in loss.graph.inputs[1:]}
    try:
        loss.compute(lp, values)
    except UserError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json, _json, _json)
def test_arbitrary_json_is_refused_cleanly(name: Any, inputs: Any, graph: Any) -> None:
    _builds_or_refuses(name, inputs, graph)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(BASE["graph"]["nodes"]) - 1),
    st.sampled_from(["op", "name", "target", "args", "kwargs", "args[0]", "args[1]", "node"]),
    _json,
)
def test_one_mutated_part_is_refused_or_runs(index: int, part: str, value: Any) -> None:
    up = copy.deepcopy(BASE)
    node = up["graph"]["nodes"][index]
    if part == "node":
        up["graph"]["nodes"][index] = value
    elif part.startswith("args["):
        args = node["args"]
        j = int(part[5])
        if j < len(args):
            args[j] = value
        else:
            args.append(value)
    else:
        node[part] = value
    _builds_or_refuses(up["name"], up["inputs"], up["graph"])
