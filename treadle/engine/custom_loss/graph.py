"""Decode an uploaded `CustomLossGraph` (torch.fx nodes as JSON data) into checked `Node`s.

Decoding is the security boundary of server-side custom losses: every node op, call target, attribute name,
keyword and constant must be on the allow-list in `allowed.py`, every reference must name an earlier node, the
placeholders must be exactly the declared inputs in order, and the output must be `(loss, {metric: tensor})`.
Anything else is refused with a `UserError` that names the node and the construct. Nothing is imported,
evaluated or looked up by name outside those tables.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from treadle.engine.custom_loss import allowed
from treadle.errors import UserError

MAX_NODES = 512
MAX_INPUTS = 16  # logprobs included, as the SDK allows
_MAX_DEPTH = 8  # nesting of an argument (lists in tuples in …)
_MAX_ITEMS = 64  # entries in one list / tuple / dict argument
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_GETATTR = ("getattr", "builtins.getattr")


@dataclasses.dataclass(frozen=True)
class Ref:
    """A reference to an earlier node's value."""

    name: str


@dataclasses.dataclass(frozen=True)
class Input:
    name: str
    rank: int  # 0: scalar, 1: [T], 2: [T, K]


@dataclasses.dataclass(frozen=True)
class Node:
    op: str  # "placeholder", "call_function", "call_method" or "output"
    name: str
    target: str
    args: tuple[Any, ...]  # decoded: Ref, numbers, str, None, list, tuple, dict, slice, Ellipsis, torch.dtype
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[Input, ...]  # logprobs first
    nodes: tuple[Node, ...]  # placeholders, then calls, then one output
    loss: Ref
    metrics: dict[str, Ref]


def _fail(field: str, message: str) -> UserError:
    return UserError(f"{field}: {message}", field=field)


def decode_inputs(raw: object) -> tuple[Input, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail("inputs", "must be a non-empty list of {name, rank}, logprobs first")
    if len(raw) > MAX_INPUTS:
        raise _fail("inputs", f"a custom loss takes at most {MAX_INPUTS} inputs, got {len(raw)}")
    out: list[Input] = []
    for i, item in enumerate(raw):
        field = f"inputs[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "rank"}:
            raise _fail(field, "must be an object with exactly the keys name and rank")
        name, rank = item.get("name"), item.get("rank")
        if not isinstance(name, str) or not _INPUT_NAME.fullmatch(name):
            raise _fail(f"{field}.name", f"must be a lowercase identifier, got {name!r}")
        if type(rank) is not int or rank not in (0, 1, 2):
            raise _fail(f"{field}.rank", f"must be 0 (scalar), 1 ([T]) or 2 ([T, K]), got {rank!r}")
        if any(x.name == name for x in out):
            raise _fail(f"{field}.name", f"{name!r} is declared twice")
        out.append(Input(name, rank))
    if out[0].name != "logprobs" or out[0].rank == 0:
        raise _fail("inputs[0]", "must be logprobs with rank 1 ([T]) or 2 ([T, K])")
    if any(x.name in ("logprobs", "target_tokens") for x in out[1:]):
        raise _fail("inputs", "logprobs comes first and once; target_tokens is not a loss input")
    return tuple(out)


def _arg(v: Any, field: str, known: set[str], depth: int = 0) -> Any:
    """One encoded argument → its decoded value (see `tinker.types.CustomLossNode.args`)."""
    if depth > _MAX_DEPTH:
        raise _fail(field, f"arguments nest deeper than {_MAX_DEPTH} levels")
    if v is None or isinstance(v, bool | int | str):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**53:
            raise _fail(field, f"integer constant {v} is out of range (|x| ≤ 2**53)")
        if isinstance(v, str) and len(v) > 128:
            raise _fail(field, "string constants are limited to 128 characters")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _fail(field, "non-finite floats are sent as {'float': 'inf' | '-inf' | 'nan'}")
        return v
    if isinstance(v, list):
        if len(v) > _MAX_ITEMS:
            raise _fail(field, f"lists are limited to {_MAX_ITEMS} entries")
        return [_arg(x, f"{field}[{i}]", known, depth + 1) for i, x in enumerate(v)]
    if not isinstance(v, dict) or len(v) != 1:
        raise _fail(field, f"must be a JSON scalar, a list or a one-key object, got {type(v).__name__}")
    ((kind, x),) = v.items()
    if kind == "ref":
        if not isinstance(x, str) or x not in known:
            raise _fail(field, f"refers to {x!r}, which is not an earlier node of the graph")
        return Ref(x)
    if kind == "tuple":
        if not isinstance(x, list) or len(x) > _MAX_ITEMS:
            raise _fail(field, f"a tuple is a list of at most {_MAX_ITEMS} entries")
        return tuple(_arg(a, f"{field}[{i}]", known, depth + 1) for i, a in enumerate(x))
    if kind == "dict":
        if not isinstance(x, dict) or len(x) > _MAX_ITEMS or not all(isinstance(k, str) for k in x):
            raise _fail(field, f"a dict maps at most {_MAX_ITEMS} string keys")
        return {k: _arg(a, f"{field}.{k}", known, depth + 1) for k, a in x.items()}
    if kind == "slice":
        if not isinstance(x, list) or len(x) != 3:
            raise _fail(field, "a slice is [start, stop, step]")
        parts = [_arg(a, f"{field}.slice", known, depth + 1) for a in x]
        if not all(p is None or isinstance(p, Ref) or type(p) is int for p in parts):
            raise _fail(field, "slice bounds must be integers, null or node references")
        return slice(*parts)
    if kind == "ellipsis":
        if x is not True:
            raise _fail(field, "an ellipsis is {'ellipsis': true}")
        return Ellipsis
    if kind == "float":
        if x not in ("inf", "-inf", "nan"):
            raise _fail(field, f"a special float is 'inf', '-inf' or 'nan', got {x!r}")
        return float(x)
    if kind == "dtype":
        if not isinstance(x, str) or x not in allowed.DTYPES:
            raise _fail(field, f"dtype {x!r} is not allowed; allowed: {', '.join(allowed.DTYPES)}")
        return allowed.DTYPES[x]
    if kind in ("device", "layout", "memory_format"):
        raise _fail(
            field, f"{kind} constants are not allowed in a custom loss (the server places its tensors)"
        )
    raise _fail(field, f"unknown argument kind {kind!r}")


def _check_call(op: str, target: str, args: tuple[Any, ...], field: str) -> None:
    if op == "call_function":
        if target in _GETATTR:
            if (
                len(args) != 2
                or not isinstance(args[0], Ref)
                or not isinstance(args[1], str)
                or args[1] not in allowed.ATTRIBUTES
            ):
                raise _fail(
                    field,
                    f"attribute access getattr{args!r} is not allowed; a loss may read only "
                    f"{', '.join(sorted(allowed.ATTRIBUTES))} of a tensor",
                )
            return
        if target not in allowed.FUNCTIONS:
            raise _fail(
                field, f"function {target!r} is not on this server's allow-list of custom-loss operations"
            )
        return
    if target not in allowed.METHODS:
        raise _fail(
            field, f"tensor method {target!r} is not on this server's allow-list of custom-loss operations"
        )
    if not args or not isinstance(args[0], Ref):
        raise _fail(field, f"method {target!r} must be called on a node's tensor")
    if target == "to" and not all(isinstance(a, torch.dtype) for a in args[1:]):
        # .to(dtype) only: a device (even as a string like "cuda") or another tensor would move data
        raise _fail(field, "method 'to' may only change the dtype, e.g. x.to(torch.float32)")


def _check_output(args: tuple[Any, ...], field: str) -> tuple[Ref, dict[str, Ref]]:
    out = args[0] if len(args) == 1 else None
    if not isinstance(out, tuple | list) or len(out) != 2:
        raise _fail(field, "the graph must return (loss, metrics)")
    loss, metrics = out
    if not isinstance(loss, Ref):
        raise _fail(field, "the loss must be a tensor computed by the graph")
    if not isinstance(metrics, dict):
        raise _fail(field, "the metrics must be a dict of tensors")
    for key, value in metrics.items():
        if not METRIC_KEY.fullmatch(key):
            raise _fail(
                field, f"metric {key!r} must be named custom/<name>:sum or custom/<name>:mean in lowercase"
            )
        if not isinstance(value, Ref):
            raise _fail(field, f"metric {key!r} must be a tensor computed by the graph")
    return loss, metrics


def decode_graph(name: object, inputs_raw: object, graph_raw: object) -> Graph:
    """Check and decode a `create_custom_loss` request's name, inputs and graph; raise a UserError naming the
    first disallowed or malformed construct."""
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        raise _fail("name", "must be a string of 1 to 128 characters")
    inputs = decode_inputs(inputs_raw)
    if not isinstance(graph_raw, dict) or set(graph_raw) - {"format", "nodes"}:
        raise _fail("graph", "must be an object with the keys format and nodes")
    if graph_raw.get("format", 1) != 1:
        raise _fail("graph.format", f"only format 1 is understood, got {graph_raw.get('format')!r}")
    raw_nodes = graph_raw.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise _fail("graph.nodes", "must be a non-empty list")
    if len(raw_nodes) > MAX_NODES:
        raise _fail("graph.nodes", f"a custom loss has at most {MAX_NODES} nodes, got {len(raw_nodes)}")
    known: set[str] = set()
    nodes: list[Node] = []
    result: tuple[Ref, dict[str, Ref]] | None = None
    for i, raw in enumerate(raw_nodes):
        field = f"graph.nodes[{i}]"
        if not isinstance(raw, dict) or set(raw) - {"op", "name", "target", "args", "kwargs"}:
            raise _fail(field, "must be an object with the keys op, name, target, args, kwargs")
        op, nname, target = raw.get("op"), raw.get("name"), raw.get("target")
        if op not in _OPS:
            raise _fail(f"{field}.op", f"must be one of {', '.join(_OPS)}, got {op!r}")
        if not isinstance(nname, str) or not _NAME.fullmatch(nname) or nname in known:
            raise _fail(f"{field}.name", f"must be a new identifier, got {nname!r}")
        if not isinstance(target, str) or len(target) > 128:
            raise _fail(f"{field}.target", "must be a string of at most 128 characters")
        field = f"{field} ({nname})"
        if result is not None:
            raise _fail(field, "nodes after the output node are not allowed")
        if op == "get_attr":
            raise _fail(field, f"get_attr {target!r} is not allowed: a custom loss may not capture tensors")
        if op == "call_module":
            raise _fail(
                field, f"call_module {target!r} is not allowed: a custom loss may not use torch.nn modules"
            )
        raw_args, raw_kwargs = raw.get("args", []), raw.get("kwargs", {})
        if not isinstance(raw_args, list) or len(raw_args) > _MAX_ITEMS:
            raise _fail(f"{field}.args", f"must be a list of at most {_MAX_ITEMS} arguments")
        if not isinstance(raw_kwargs, dict):
            raise _fail(f"{field}.kwargs", "must be an object")
        for key in raw_kwargs:
            if key not in allowed.KWARGS:
                raise _fail(f"{field}.kwargs", f"keyword {key!r} is not allowed in a custom loss")
        args = tuple(_arg(a, f"{field}.args[{j}]", known) for j, a in enumerate(raw_args))
        kwargs = {k: _arg(v, f"{field}.kwargs.{k}", known) for k, v in raw_kwargs.items()}
        if op == "placeholder":
            if nodes and nodes[-1].op != "placeholder":
                raise _fail(field, "placeholders must come before every other node")
            j = len(nodes)
            if j >= len(inputs) or target != inputs[j].name or args or kwargs:
                want = inputs[j].name if j < len(inputs) else "no further input"
                raise _fail(
                    field, f"placeholder {target!r} does not match the declared inputs (expected {want})"
                )
        elif op == "output":
            if len(nodes) < len(inputs):
                raise _fail(field, "the graph does not take every declared input")
            result = _check_output(args, field)
        else:
            if len(nodes) < len(inputs):
                raise _fail(field, "the graph does not take every declared input")
            _check_call(op, target, args, field)
        known.add(nname)
        nodes.append(Node(op, nname, target, args, kwargs))
    if result is None:
        raise _fail("graph.nodes", "the graph has no output node")
    return Graph(name, inputs, tuple(nodes), result[0], result[1])
