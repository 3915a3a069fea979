"""The explicit allow-list a server-side custom loss is rebuilt from: every wire name a `CustomLossGraph` node
may call, mapped to the one function or tensor method it stands for, and the keyword arguments they may take.

Nothing here is looked up by name at run time (no `getattr` on modules, no imports): a target that is not a key
of these tables is refused. Everything in them is a pure, differentiable-or-harmless tensor op that cannot read
files, allocate without bound from a constant (no `torch.zeros(size)`), or change its inputs in place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# call_function targets, as the SDK writes them (`torch.fx.node._get_qualified_name`, `_operator.` shown as
# `operator.`). torch.nn.functional functions that are C bindings are recorded under `torch._C._nn`.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    # Python operators on tensors and numbers
    "operator.add": operator.add,
    "operator.sub": operator.sub,
    "operator.mul": operator.mul,
    "operator.truediv": operator.truediv,
    "operator.floordiv": operator.floordiv,
    "operator.mod": operator.mod,
    "operator.pow": operator.pow,
    "operator.neg": operator.neg,
    "operator.pos": operator.pos,
    "operator.abs": operator.abs,
    "operator.lt": operator.lt,
    "operator.le": operator.le,
    "operator.gt": operator.gt,
    "operator.ge": operator.ge,
    "operator.eq": operator.eq,
    "operator.ne": operator.ne,
    "operator.and_": operator.and_,
    "operator.or_": operator.or_,
    "operator.invert": operator.invert,
    "operator.getitem": operator.getitem,
    # elementwise math
    "torch.exp": torch.exp,
    "torch.log": torch.log,
    "torch.log1p": torch.log1p,
    "torch.expm1": torch.expm1,
    "torch.sqrt": torch.sqrt,
    "torch.rsqrt": torch.rsqrt,
    "torch.square": torch.square,
    "torch.abs": torch.abs,
    "torch.neg": torch.neg,
    "torch.sign": torch.sign,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "torch.relu": torch.relu,
    "torch.pow": torch.pow,
    "torch.add": torch.add,
    "torch.sub": torch.sub,
    "torch.mul": torch.mul,
    "torch.div": torch.div,
    "torch.clamp": torch.clamp,
    "torch.clip": torch.clip,
    "torch.minimum": torch.minimum,
    "torch.maximum": torch.maximum,
    "torch.where": torch.where,
    "torch.isfinite": torch.isfinite,
    "torch.nan_to_num": torch.nan_to_num,
    "torch.logaddexp": torch.logaddexp,
    # reductions and shape ops
    "torch.sum": torch.sum,
    "torch.mean": torch.mean,
    "torch.amax": torch.amax,
    "torch.amin": torch.amin,
    "torch.logsumexp": torch.logsumexp,
    "torch.softmax": torch.softmax,
    "torch.log_softmax": torch.log_softmax,
    "torch.cumsum": torch.cumsum,
    "torch.stack": torch.stack,
    "torch.cat": torch.cat,
    "torch.gather": torch.gather,
    "torch.flatten": torch.flatten,
    "torch.squeeze": torch.squeeze,
    "torch.unsqueeze": torch.unsqueeze,
    "torch.zeros_like": torch.zeros_like,
    "torch.ones_like": torch.ones_like,
    "torch.full_like": torch.full_like,
    # torch.nn.functional, under both names fx records
    "torch._C._nn.log_sigmoid": F.logsigmoid,
    "torch.nn.functional.logsigmoid": F.logsigmoid,
    "torch._C._nn.softplus": F.softplus,
    "torch.nn.functional.softplus": F.softplus,
    "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.softmax": F.softmax,
    "torch.nn.functional.log_softmax": F.log_softmax,
}

# Tensor attributes a graph may read (fx records `x.shape` as a call to the builtin getattr).
ATTRIBUTES = frozenset({"shape", "ndim", "dtype"})

# call_method targets: out-of-place tensor methods only (no `_`-suffixed in-place ones, no `.item()`/`.tolist()`
# that leave torch, no `.to(device)`, no `.backward()`).
METHODS = frozenset(
    {
        "abs", "add", "amax", "amin", "clamp", "clip", "cumsum", "detach", "dim", "div", "double", "exp",
        "expand", "expand_as", "expm1", "flatten", "float", "gather", "log", "log1p", "log_softmax",
        "logsumexp", "masked_fill", "max", "mean", "min", "mul", "neg", "numel", "pow", "reciprocal", "relu",
        "reshape", "rsqrt", "sigmoid", "sign", "size", "softmax", "sqrt", "square", "squeeze", "sub", "sum",
        "t", "tanh", "to", "transpose", "type_as", "unsqueeze", "view", "where",
    }
)  # fmt: skip

# Keyword arguments any allowed call may take. Notably absent: `out` (writes into a tensor), `device`.
KWARGS = frozenset(
    {
        "dim", "keepdim", "min", "max", "dtype", "alpha", "beta", "threshold", "index", "value", "mask",
        "condition", "exponent", "other", "input", "start_dim", "end_dim", "dim0", "dim1", "nan", "posinf",
        "neginf", "fill_value", "rounding_mode",
    }
)  # fmt: skip

# dtype constants a graph may name ({"dtype": "float32"} on the wire).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
