"""Server-side custom losses without a server: graphs the SDK encodes rebuild to the same values and gradients
as the traced function; every disallowed construct is refused with a message naming it; bounds hold."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from treadle.engine.custom_loss import build
from treadle.errors import UserError


def dpo_style(logprobs, ref, chosen, rejected):  # noqa: ANN001, ANN201 - traced by torch.fx
    delta = logprobs - ref
    margin = 0.5 * ((delta * chosen).sum() - (delta * rejected).sum())
    return -F.logsigmoid(margin), {"custom/margin:mean": margin.detach()}


def topk_distill(logprobs, teacher, scale):  # noqa: ANN001, ANN201 - rank-2 logprobs and a scalar input
    p = torch.softmax(teacher, dim=-1)
    loss = -(p * logprobs).sum() * scale
    return loss, {"custom/n:sum": torch.ones_like(scale) * logprobs.shape[0]}


def _upload(fn: Any, ranks: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    handle = trace_loss(fn, ranks, "session")  # pyright: ignore[reportArgumentType]
    return handle, {
        "name": handle.name,
        "inputs": [x.model_dump() for x in handle.inputs],
        "graph": encode_graph(handle).model_dump(),
    }


@pytest.mark.parametrize(
    ("fn", "ranks", "shapes"),
    [
        (
            dpo_style,
            {"logprobs": 1, "ref": 1, "chosen": 1, "rejected": 1},
            {"ref": [6], "chosen": [6], "rejected": [6]},
        ),
        (topk_distill, {"logprobs": 2, "teacher": 2, "scale": 0}, {"teacher": [6, 3], "scale": []}),
    ],
)
def test_rebuilt_graph_matches_the_traced_function(
    fn: Any, ranks: dict[str, int], shapes: dict[str, list[int]]
) -> None:
    handle, up = _upload(fn, ranks)
    loss = build(up["name"], up["inputs"], up["graph"])
    g = torch.Generator().manual_seed(0)
    lp_shape = [6] if ranks["logprobs"] == 1 else [6, 3]
    lp = -torch.rand(lp_shape, generator=g)
    inputs = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
    ours = lp.clone().requires_grad_(True)
    out = loss.compute(ours, inputs)
    out.loss.backward()
    ref = lp.clone().requires_grad_(True)
    ref_loss, ref_metrics = handle.graph(ref, *[inputs[k] for k in handle.input_names])
    ref_loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(ref_loss))
    for k, v in ref_metrics.items():
        assert out.metrics[k] == pytest.approx(float(v))
    assert ours.grad is not None and ref.grad is not None
    torch.testing.assert_close(ours.grad, ref.grad)


def _base() -> dict[str, Any]:
    return {
        "name": "neg_ll",
        "inputs": [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 1}],
        "graph": {
            "format": 1,
            "nodes": [
                {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
                {"op": "placeholder", "name": "weights", "target": "weights"},
                {"op": "call_function", "name": "mul", "target": "operator.mul", "args": [{"ref": "logprobs"}, {"ref": "weights"}]},
                {"op": "call_method", "name": "s", "target": "sum", "args": [{"ref": "mul"}]},
                {"op": "call_function", "name": "neg", "target": "operator.neg", "args": [{"ref": "s"}]},
                {"op": "output", "name": "output", "target": "output", "args": [{"tuple": [{"ref": "neg"}, {"dict": {"custom/nll:sum": {"ref": "neg"}}}]}]},
            ],
        },
    }  # fmt: skip


def _with_node(node: dict[str, Any], loss_ref: str | None = None) -> dict[str, Any]:
    up = _base()
    nodes = up["graph"]["nodes"]
    nodes.insert(4, node)
    if loss_ref:
        nodes[-1]["args"] = [{"tuple": [{"ref": loss_ref}, {"dict": {}}]}]
    return up


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("a function off the list", _with_node({"op": "call_function", "name": "x", "target": "builtins.open", "args": ["/etc/passwd"]}), "builtins.open"),
    ("eval", _with_node({"op": "call_function", "name": "x", "target": "builtins.eval", "args": ["1"]}), "builtins.eval"),
    ("an import path", _with_node({"op": "call_function", "name": "x", "target": "os.system", "args": ["ls"]}), "os.system"),
    ("torch.load", _with_node({"op": "call_function", "name": "x", "target": "torch.load", "args": ["f"]}), "torch.load"),
    ("get_attr", _with_node({"op": "get_attr", "name": "x", "target": "captured"}), "get_attr"),
    ("call_module", _with_node({"op": "call_module", "name": "x", "target": "linear", "args": [{"ref": "s"}]}), "call_module"),
    ("an in-place method", _with_node({"op": "call_method", "name": "x", "target": "add_", "args": [{"ref": "s"}, 1]}), "add_"),
    ("item()", _with_node({"op": "call_method", "name": "x", "target": "item", "args": [{"ref": "s"}]}), "item"),
    ("backward()", _with_node({"op": "call_method", "name": "x", "target": "backward", "args": [{"ref": "s"}]}), "backward"),
    ("a dunder attribute", _with_node({"op": "call_function", "name": "x", "target": "getattr", "args": [{"ref": "s"}, "__class__"]}), "__class__"),
    ("the out= keyword", _with_node({"op": "call_function", "name": "x", "target": "torch.exp", "args": [{"ref": "s"}], "kwargs": {"out": {"ref": "s"}}}), "'out'"),
    ("a device constant", _with_node({"op": "call_method", "name": "x", "target": "float", "args": [{"ref": "s"}, {"device": "cuda"}]}), "device"),
    ("a disallowed dtype", _with_node({"op": "call_method", "name": "x", "target": "float", "args": [{"ref": "s"}, {"dtype": "complex64"}]}), "complex64"),
    ("a forward reference", _with_node({"op": "call_function", "name": "x", "target": "operator.neg", "args": [{"ref": "neg"}]}), "'neg'"),
    ("an unknown argument kind", _with_node({"op": "call_function", "name": "x", "target": "operator.neg", "args": [{"lambda": "x"}]}), "lambda"),
    ("a method on a constant", _with_node({"op": "call_method", "name": "x", "target": "sum", "args": [3]}), "sum"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "upload", "named"), REFUSED, ids=[r[0] for r in REFUSED])
def test_disallowed_construct_is_refused_by_name(what: str, upload: dict[str, Any], named: str) -> None:
    with pytest.raises(UserError, match="graph") as e:
        build(upload["name"], upload["inputs"], upload["graph"])
    assert named in e.value.message, e.value.message


def test_structure_errors_name_the_field() -> None:
    up = _base()
    up["graph"]["nodes"][0]["target"] = "weights"
    with pytest.raises(UserError, match="does not match the declared inputs"):
        build(**up)
    up = _base()
    up["graph"]["nodes"][-1]["args"] = [{"ref": "neg"}]
    with pytest.raises(UserError, match=r"return \(loss, metrics\)"):
        build(**up)
    up = _base()
    up["graph"]["nodes"][-1]["args"][0]["tuple"][1]["dict"] = {"loss:sum": {"ref": "neg"}}
    with pytest.raises(UserError, match="custom/<name>"):
        build(**up)
    up = _base()
    up["inputs"][0]["rank"] = 0
    with pytest.raises(UserError, match=r"inputs\[0\]"):
        build(**up)
    up = _base()
    up["graph"]["nodes"] = up["graph"]["nodes"][:2] + [
        copy.deepcopy(up["graph"]["nodes"][2]) for _ in range(600)
    ]
    with pytest.raises(UserError, match="at most 512 nodes"):
        build(**up)


def test_runtime_bounds() -> None:
    # list repetition and huge Python powers are refused instead of run
    rep = _with_node({"op": "call_function", "name": "x", "target": "operator.mul", "args": [[0], 10**9]})
    with pytest.raises(UserError, match="operands must be tensors or numbers"):
        build(**rep)
    big = _with_node({"op": "call_function", "name": "x", "target": "operator.pow", "args": [10**6, 10**6]})
    with pytest.raises(UserError, match="exponent is limited"):
        build(**big)
    # a view that would make the next node allocate 10^10 elements is stopped at the node that makes it
    huge = _with_node(
        {"op": "call_method", "name": "x", "target": "expand", "args": [{"ref": "s"}, 100000, 100000]}
    )
    with pytest.raises(UserError, match="limited to"):
        build(**huge)
    # a non-scalar loss is refused at upload (dry run)
    up = _base()
    up["graph"]["nodes"][-1]["args"] = [{"tuple": [{"ref": "mul"}, {"dict": {}}]}]
    with pytest.raises(UserError, match="scalar"):
        build(**up)


def test_datum_validation_names_the_input() -> None:
    loss = build(**_base())
    targets = torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="loss_fn_inputs.weights"):
        loss.validate({"target_tokens": targets}, 4, 10)
    with pytest.raises(UserError, match=r"loss_fn_inputs.weights.*rank 1"):
        loss.validate({"target_tokens": targets, "weights": torch.ones(3)}, 4, 10)
    with pytest.raises(UserError, match="target_tokens"):
        loss.validate({"target_tokens": torch.zeros(4, 2, dtype=torch.long), "weights": torch.ones(4)}, 4, 10)
    loss.validate({"target_tokens": targets, "weights": torch.ones(4)}, 4, 10)


def test_to_changes_only_the_dtype() -> None:
    to_cuda = _with_node({"op": "call_method", "name": "x", "target": "to", "args": [{"ref": "s"}, "cuda"]})
    with pytest.raises(UserError, match="may only change the dtype"):
        build(**to_cuda)
    to_f64 = _with_node(
        {"op": "call_method", "name": "x", "target": "to", "args": [{"ref": "s"}, {"dtype": "float64"}]}
    )
    build(**to_f64)


def test_outer_broadcast_is_refused_before_it_is_computed() -> None:
    def outer(logprobs):  # noqa: ANN001, ANN202 - [T, 1] * [1, T]: T² elements
        return (logprobs.unsqueeze(1) * logprobs.unsqueeze(0)).sum(), {}

    _, up = _upload(outer, {"logprobs": 1})
    loss = build(up["name"], up["inputs"], up["graph"])  # fine on the small dry-run shapes
    with pytest.raises(UserError, match="would broadcast to 9000000 elements"):
        loss.compute(torch.zeros(3000), {})
