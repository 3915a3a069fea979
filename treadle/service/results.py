"""What a resolved future holds, as domain values (no wire shape, no protobuf): one frozen type per operation,
and the versioned payload they are persisted as in the futures table so a result outlives a restart.

Three type families meet here: the API turns these into wire messages (`treadle/api/tinker/codec.py`
`to_wire`), and `dump`/`load` turn them into the bytes or JSON text a futures row keeps. The payload is the
service's own format: JSON `{"v": 1, "result": <type name>, "fields": {…}}` for results made of scalars, and a safetensors blob (its JSON
body in the header metadata, its tensors exact, of any dtype) for forward_backward and sample results.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from treadle.engine.types import ForwardBackwardResult, SampledSequence, SampleResult
from treadle.errors import TreadleError

VERSION = 1
_META_KEY = "treadle.result"  # safetensors metadata: the payload version; "body" holds its JSON


@dataclasses.dataclass(frozen=True)
class ModelCreated:
    model_id: str


@dataclasses.dataclass(frozen=True)
class Optimized:
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class WeightsSaved:
    path: str
    kind: str  # "weights" | "sampler_weights"


@dataclasses.dataclass(frozen=True)
class ExternalWeightsSaved:
    path: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class WeightsLoaded:
    path: str
    model_id: str


@dataclasses.dataclass(frozen=True)
class SamplerSnapshot:
    sampling_session_id: str


@dataclasses.dataclass(frozen=True)
class CustomLossCreated:
    loss_id: str


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A training run's model, as `get_info` describes it (answered at once, not through a future)."""

    model_id: str
    arch: str
    model_name: str
    tokenizer_dir: str
    lora_rank: int | None


@dataclasses.dataclass(frozen=True)
class Sampled:
    """A sample's result plus what answering it needs from its request: how many top-k slots each row has, and
    the target ids the target logprobs answer (and whether they came sparse, to answer in kind)."""

    result: SampleResult
    topk_sample_logprobs: int = 0
    topk_prompt_logprobs: int = 0
    target_ids: torch.Tensor | None = None
    target_sparse: bool = False


# A forward_backward resolves with the engine's own result type.
Result = (
    ModelCreated
    | Optimized
    | WeightsSaved
    | ExternalWeightsSaved
    | WeightsLoaded
    | SamplerSnapshot
    | CustomLossCreated
    | Sampled
    | ForwardBackwardResult
)

_SCALAR: dict[str, type] = {
    t.__name__: t
    for t in (
        ModelCreated,
        Optimized,
        WeightsSaved,
        ExternalWeightsSaved,
        WeightsLoaded,
        SamplerSnapshot,
        CustomLossCreated,
    )
}


class PayloadError(TreadleError):
    """A stored payload this version cannot read (written by another treadle version, or damaged)."""


def dump(result: Result) -> tuple[str | None, bytes | None]:
    """(JSON text, blob): exactly one is set. Runs where the result is made (a worker or the resolver thread)."""
    if isinstance(result, ForwardBackwardResult):
        return None, _dump_forward_backward(result)
    if isinstance(result, Sampled):
        return None, _dump_sampled(result)
    body = {"v": VERSION, "result": type(result).__name__, "fields": dataclasses.asdict(result)}
    return json.dumps(body), None


def load(text: str | None, blob: bytes | None) -> Result:
    if blob is not None:
        return _load_blob(blob)
    try:
        body = json.loads(text or "")
        version, kind, fields = body["v"], body["result"], body["fields"]
        if version != VERSION or kind not in _SCALAR:
            raise ValueError(f"payload {kind!r} v{version}")
        return _SCALAR[kind](**fields)
    except (ValueError, KeyError, TypeError) as e:
        raise PayloadError(f"the stored result is not readable here ({e}); submit again") from e


# ---- tensors -----------------------------------------------------------------------------------------------
def _own(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage (per-datum views of one batch output do)
    return t.detach().cpu().contiguous().clone()


def _blob(kind: str, body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    meta = {_META_KEY: str(VERSION), "kind": kind, "body": json.dumps(body)}
    return st_save({k: _own(v) for k, v in tensors.items()}, metadata=meta)


def _load_blob(blob: bytes) -> Result:
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
        version, kind = meta.get(_META_KEY), meta.get("kind")
        if version != str(VERSION) or kind not in ("forward_backward", "sample"):
            raise ValueError(f"payload {kind!r} v{version}")
        body, tensors = json.loads(meta["body"]), st_load(blob)
    except (ValueError, KeyError, struct.error, TypeError, AttributeError) as e:
        raise PayloadError(f"the stored result is not readable here ({e}); submit again") from e
    if kind == "forward_backward":
        return _load_forward_backward(body, tensors)
    return _load_sampled(body, tensors)


def _dump_forward_backward(res: ForwardBackwardResult) -> bytes:
    names = [list(d) for d in res.loss_fn_outputs]  # per datum, in order (the wire keeps it)
    tensors = {f"{i}/{j}": d[n] for i, d in enumerate(res.loss_fn_outputs) for j, n in enumerate(d)}
    body = {"names": names, "metrics": {k: float(v) for k, v in res.metrics.items()}}
    return _blob("forward_backward", body, tensors)


def _load_forward_backward(body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ForwardBackwardResult:
    outputs = [{n: tensors[f"{i}/{j}"] for j, n in enumerate(names)} for i, names in enumerate(body["names"])]
    return ForwardBackwardResult(loss_fn_outputs=outputs, metrics=body["metrics"])


def _dump_sampled(s: Sampled) -> bytes:
    r = s.result
    # every sequence's tokens and logprobs in one tensor each (one conversion, not one per sequence); float64
    # holds every logprob exactly (they are float32 values or Python floats)
    tensors = {
        "tokens": torch.tensor([t for q in r.sequences for t in q.tokens], dtype=torch.int64),
        "logprobs": torch.tensor([x for q in r.sequences for x in q.logprobs], dtype=torch.float64),
    }
    seqs = [
        {"n": len(q.tokens), "stop_reason": q.stop_reason, "topk": _pairs(q.topk_logprobs)}
        for q in r.sequences
    ]
    for name, t in (
        ("target_prompt_logprobs", r.target_prompt_logprobs),
        ("target_ids", s.target_ids),
        ("alt_ids", r.prompt_alt_tokens[0] if r.prompt_alt_tokens is not None else None),
        ("alt_logprobs", r.prompt_alt_tokens[1] if r.prompt_alt_tokens is not None else None),
    ):
        if t is not None:
            tensors[name] = t
    body = {
        "sequences": seqs,
        "prompt_logprobs": _floats(r.prompt_logprobs),
        "topk_prompt_logprobs": _pairs(r.topk_prompt_logprobs),
        "prompt_cache_hit_tokens": int(r.prompt_cache_hit_tokens),
        "topk_sample_logprobs": int(s.topk_sample_logprobs),
        "topk_prompt_k": int(s.topk_prompt_logprobs),
        "target_sparse": bool(s.target_sparse),
    }
    return _blob("sample", body, tensors)


def _load_sampled(body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Sampled:
    tokens, logprobs = tensors["tokens"].tolist(), tensors["logprobs"].tolist()
    seqs, at = [], 0
    for q in body["sequences"]:
        n = q["n"]
        seqs.append(
            SampledSequence(tokens[at : at + n], logprobs[at : at + n], q["stop_reason"], _tuples(q["topk"]))
        )
        at += n
    alt = tensors.get("alt_ids"), tensors.get("alt_logprobs")
    result = SampleResult(
        sequences=seqs,
        prompt_logprobs=body["prompt_logprobs"],
        topk_prompt_logprobs=_tuples(body["topk_prompt_logprobs"]),
        prompt_cache_hit_tokens=body["prompt_cache_hit_tokens"],
        target_prompt_logprobs=tensors.get("target_prompt_logprobs"),
        prompt_alt_tokens=(alt[0], alt[1]) if alt[0] is not None and alt[1] is not None else None,
    )
    return Sampled(
        result,
        topk_sample_logprobs=body["topk_sample_logprobs"],
        topk_prompt_logprobs=body["topk_prompt_k"],
        target_ids=tensors.get("target_ids"),
        target_sparse=body["target_sparse"],
    )


def _floats(xs: list[float] | None) -> list[float | None] | None:
    return None if xs is None else [None if x is None else float(x) for x in xs]


def _pairs(rows: list[list[tuple[int, float]]] | None) -> list[list[list[int | float]]] | None:
    return None if rows is None else [[[int(t), float(lp)] for t, lp in row] for row in rows]


def _tuples(rows: list[list[list[Any]]] | None) -> list[list[tuple[int, float]]] | None:
    return None if rows is None else [[(int(t), float(lp)) for t, lp in row] for row in rows]
