"""Wire ↔ internal conversion: the two protobuf payloads (protocol §8), using the SDK's own schema
(`tinker.proto.tinker_public_pb2`) so it is never re-declared here, the JSON sampling params, and `to_wire`,
which turns a future's domain result (`treadle.service.results`) into the body the SDK expects."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from treadle.api.tinker.images import dmel_refused, image_from_proto
from treadle.engine.types import (
    Datum,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    ImageInput,
    SamplingParams,
)
from treadle.errors import UserError, require
from treadle.service import results
from treadle.service.results import Result, Sampled

_NP_DTYPE = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_TORCH_OUT = {torch.float32: pb.DTYPE_FLOAT32, torch.int64: pb.DTYPE_INT64, torch.int32: pb.DTYPE_INT32}
EMPTY_TOPK_LOGPROB = -99999.0  # protocol §6.2: empty top-k slots are token 0 / −99999
# Results above this many elements are encoded on a thread: a few ms of work would otherwise hold every other
# request on the event loop (below it, the thread hop costs more than the encoding).
HEAVY_ELEMENTS = 16_384


def decode_forward_backward(body: bytes) -> tuple[str, int, ForwardBackwardRequest]:
    """Returns (model_id, seq_id, request); every malformed part is a UserError naming the field."""
    return forward_backward_from_message(parse_forward_backward(body))


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    """The protobuf message alone (its model_id and seq_id are readable even if its data is invalid)."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise UserError(
            f"body: not a valid tinker_public.ForwardBackwardRequest protobuf ({e})", field="body"
        ) from e
    return msg


def forward_backward_from_message(msg: pb.ForwardBackwardRequest) -> tuple[str, int, ForwardBackwardRequest]:
    require_text(msg.model_id, "model_id")
    config: dict[str, float] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") == "number":
            config[k] = float(v.number)
        elif msg.loss_fn != "custom":
            raise UserError(
                f"loss_fn_config.{k}: {msg.loss_fn} options are numbers; only loss_fn 'custom' takes text (loss_id)",
                field=f"loss_fn_config.{k}",
            )
    data = [_datum(d, i) for i, d in enumerate(msg.data)]
    req = ForwardBackwardRequest(msg.model_id, data, msg.loss_fn, config, forward_only=msg.forward_only)
    return msg.model_id, int(msg.seq_id), req


def custom_loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    """loss_fn 'custom''s config with its text values (the loss_id), which the numeric config leaves out."""
    out: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        out[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    return out


def require_text(value: str, field: str) -> None:
    if not value:
        raise UserError(f"{field}: required", field=field)


def _datum(d: pb.Datum, i: int) -> Datum:
    parts: list[np.ndarray] = []
    images: list[ImageInput] = []
    n_text = 0
    for j, chunk in enumerate(d.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind == "image":  # expanded by the engine, which knows the model's image processor
            images.append(image_from_proto(chunk.image, n_text, f"data[{i}].model_input[{j}]"))
            continue
        if kind == "dmel":
            raise dmel_refused(f"data[{i}].model_input[{j}]")
        if kind != "encoded_text":
            raise UserError(
                f"data[{i}].model_input[{j}]: chunk type {kind!r} is not one of encoded_text, image",
                field=f"data[{i}].model_input",
            )
        if len(chunk.encoded_text.tokens) % 4:
            raise UserError(
                f"data[{i}].model_input: token bytes must be int32 little-endian",
                field=f"data[{i}].model_input",
            )
        parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
        n_text += len(parts[-1])
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    inputs = {name: _tensor(t, f"data[{i}].loss_fn_inputs.{name}") for name, t in d.loss_fn_inputs.items()}
    return Datum(torch.from_numpy(tokens.astype(np.int64)), inputs, images=images)


def _tensor(t: pb.Tensor, field: str) -> torch.Tensor:
    np_dtype = _NP_DTYPE.get(t.dtype)
    if np_dtype is None:
        raise UserError(f"{field}: dtype must be FLOAT32 or INT64, got {t.dtype}", field=field)
    shape = [int(s) for s in t.shape]
    try:
        if t.WhichOneof("encoding") == "sparse_csr":
            csr = t.sparse_csr
            values = torch.from_numpy(np.frombuffer(csr.values, dtype=np_dtype).copy())
            crow = torch.from_numpy(np.frombuffer(csr.crow_indices, dtype=np.int64).copy())
            col = torch.from_numpy(np.frombuffer(csr.col_indices, dtype=np.int64).copy())
            if len(shape) != 2:
                raise ValueError("sparse CSR tensors must have a 2-D shape")
            out = torch.sparse_csr_tensor(crow, col, values, size=tuple(shape)).to_dense()
        else:
            arr = np.frombuffer(t.dense, dtype=np_dtype).copy()
            out = torch.from_numpy(arr.reshape(shape) if shape else arr)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{field}: data does not match shape {shape} ({e})", field=field) from e
    return out.to(torch.int64) if out.dtype == torch.int32 else out


def to_wire(result: Result) -> bytes | dict[str, Any]:
    """Protobuf bytes for forward_backward and sample results (protocol §8), else the JSON body with its
    `type`; the same result always gives the same bytes, whether it comes from memory or the store."""
    match result:
        case ForwardBackwardResult():
            return encode_forward_backward(result)
        case Sampled():
            return encode_sample(result)
        case results.ModelCreated(model_id=mid):
            return {"model_id": mid, "type": "create_model"}
        case results.Optimized(metrics=metrics):
            return {"metrics": metrics, "type": "optim_step"}
        case results.WeightsSaved(path=path, kind=kind):
            return {"path": path, "type": "save_weights" if kind == "weights" else "save_weights_for_sampler"}
        case results.ExternalWeightsSaved(path=path, size_bytes=size):
            return {"path": path, "size_bytes": size, "type": "save_weights_external"}
        case results.WeightsLoaded(path=path, model_id=mid):
            return {"path": path, "model_id": mid, "type": "load_weights"}
        case results.SamplerSnapshot(sampling_session_id=sid):
            return {"sampling_session_id": sid, "type": "save_weights_for_sampler"}
        case results.CustomLossCreated(loss_id=loss_id):
            return {"loss_id": loss_id, "type": "create_custom_loss"}
    raise TypeError(f"no wire form for {type(result).__name__}")


def model_info(info: results.ModelInfo) -> dict[str, Any]:
    """`get_info`'s answer (the SDK's GetInfoResponse)."""
    return {
        "model_id": info.model_id,
        "model_data": {"arch": info.arch, "model_name": info.model_name, "tokenizer_id": info.tokenizer_dir},
        "is_lora": True,
        "lora_rank": info.lora_rank,
        "model_name": info.model_name,
        "type": "get_info",
    }


def is_heavy(result: Result) -> bool:
    """Whether encoding `result` is worth a thread hop off the event loop (big tensors or many tokens)."""
    if isinstance(result, ForwardBackwardResult):
        return sum(t.numel() for d in result.loss_fn_outputs for t in d.values()) > HEAVY_ELEMENTS
    if isinstance(result, Sampled):
        return sum(len(s.tokens) for s in result.result.sequences) > HEAVY_ELEMENTS
    return False


def encode_forward_backward(res: ForwardBackwardResult) -> bytes:
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in res.metrics.items():
        out.metrics[k] = float(v)
    # One record per datum: the SDK concatenates records in order, and each record may carry its own
    # trailing shape, so ragged outputs (1-D and (N, K) logprobs) need no padding.
    for datum in res.loss_fn_outputs:
        rec = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=1)
        for name, tensor in datum.items():
            t = tensor.detach().cpu()
            if t.dtype not in _TORCH_OUT:
                t = t.float() if t.is_floating_point() else t.long()
            data = t.contiguous().numpy().tobytes()
            bt = rec.fields[name]
            bt.data = data
            bt.offsets = np.array([0, len(data)], dtype=np.int64).tobytes()
            bt.dtype = _TORCH_OUT[t.dtype]
            bt.trailing_shape.extend(list(t.shape[1:]))
    # deterministic: map entries (metrics, fields) in key order, so the same result is always the same bytes
    return out.SerializeToString(deterministic=True)


def target_ids(raw: object) -> torch.Tensor | None:
    """`target_prompt_logprobs` (JSON TensorData, dense or sparse CSR) → a dense int64 [P - 1, K] tensor of ids,
    -1 where nothing is requested (the SDK's sparse pad value)."""
    field = "target_prompt_logprobs"
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise UserError(f"{field}: must be a TensorData object with data, dtype and shape", field=field)
    shape = raw.get("shape")
    require(
        raw.get("dtype") == "int64",
        field,
        f"must be an int64 tensor of token ids, got dtype {raw.get('dtype')!r}",
    )
    require(
        isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s >= 0 for s in shape),
        field,
        f"must be 2-D, [len(prompt) - 1, K], got shape {shape!r}",
    )
    assert isinstance(shape, list)
    data, crow, col = raw["data"], raw.get("sparse_crow_indices"), raw.get("sparse_col_indices")
    require(all(type(x) is int for x in data), field, "data must be integer token ids (-1 = no request)")
    try:
        values = torch.tensor(data, dtype=torch.int64)
        if crow is None and col is None:
            return values.reshape(shape)
        if not isinstance(crow, list) or not isinstance(col, list):
            raise ValueError("sparse_crow_indices and sparse_col_indices come together")
        # CSR with pad -1: shift by +1 so the unlisted cells (torch's zeros) become -1 after shifting back
        crow_t, col_t = torch.tensor(crow, dtype=torch.int64), torch.tensor(col, dtype=torch.int64)
        dense = torch.sparse_csr_tensor(crow_t, col_t, values + 1, size=tuple(shape)).to_dense()
        return dense - 1
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{field}: data does not match shape {shape} ({e})", field=field) from e


def is_sparse(raw: object) -> bool:
    return isinstance(raw, dict) and raw.get("sparse_crow_indices") is not None


def _sparse_like(values_R_K: torch.Tensor, ids_R_K: torch.Tensor) -> pb.Tensor:
    """`values` as float32 sparse CSR listing exactly the cells the request asked for (ids ≥ 0)."""
    mask = ids_R_K >= 0
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    crow[1:] = mask.sum(1).cumsum(0)
    rows, cols = mask.nonzero(as_tuple=True)
    csr = pb.SparseCsr(
        values=values_R_K[rows, cols].float().numpy().tobytes(),
        crow_indices=crow.numpy().tobytes(),
        col_indices=cols.to(torch.int64).numpy().tobytes(),
    )
    return pb.Tensor(sparse_csr=csr, dtype=pb.DTYPE_FLOAT32, shape=list(values_R_K.shape))


def _dense(t: torch.Tensor, dtype: Any) -> pb.Tensor:
    np_dtype = np.float32 if dtype == pb.DTYPE_FLOAT32 else np.int64
    return pb.Tensor(
        dense=t.detach().cpu().numpy().astype(np_dtype).tobytes(), dtype=dtype, shape=list(t.shape)
    )


def _topk_matrix(rows: list[list[tuple[int, float]]], k: int, out: pb.TopkLogprobs) -> None:
    """Rows of up to k (token, logprob) pairs → the dense (n, k) matrices, empty slots token 0 / −99999."""
    n = len(rows)
    ids = np.zeros((n, k), dtype=np.int32)
    lps = np.full((n, k), EMPTY_TOPK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (tok, lp_) in enumerate(row[:k]):
            ids[i, j] = tok
            lps[i, j] = lp_
    out.token_ids = ids.tobytes()
    out.logprobs = lps.tobytes()
    out.k = k
    out.length = n


def encode_sample(sampled: Sampled) -> bytes:
    res = sampled.result
    out = pb.SampleResponse(prompt_cache_hit_tokens=int(res.prompt_cache_hit_tokens))
    for s in res.sequences:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype=np.float32).tobytes()
        if sampled.topk_sample_logprobs > 0 and s.topk_logprobs is not None:
            _topk_matrix(s.topk_logprobs, sampled.topk_sample_logprobs, seq.topk_sampled_logprobs)
    if res.prompt_logprobs is not None:
        lp = np.asarray([math.nan if v is None else v for v in res.prompt_logprobs], dtype=np.float32)
        out.prompt_logprobs = lp.tobytes()
    k = sampled.topk_prompt_logprobs
    if k > 0 and res.topk_prompt_logprobs is not None:
        _topk_matrix(res.topk_prompt_logprobs, k, out.topk_prompt_logprobs)
    if res.target_prompt_logprobs is not None:
        ids = sampled.target_ids
        if sampled.target_sparse and ids is not None:
            out.target_prompt_logprobs.CopyFrom(_sparse_like(res.target_prompt_logprobs, ids))
        else:
            out.target_prompt_logprobs.CopyFrom(_dense(res.target_prompt_logprobs, pb.DTYPE_FLOAT32))
    if res.prompt_alt_tokens is not None:
        ids_t, lps_t = res.prompt_alt_tokens
        out.prompt_alt_tokens.tokens.CopyFrom(_dense(ids_t, pb.DTYPE_INT64))
        out.prompt_alt_tokens.logprobs.CopyFrom(_dense(lps_t, pb.DTYPE_FLOAT32))
    return out.SerializeToString(deterministic=True)


def sampling_params(raw: dict[str, Any]) -> SamplingParams:
    """The SDK's JSON sampling params → engine params (`stop` may be a string, strings or token ids)."""
    stop = raw.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not isinstance(stop, list):
        raise UserError(
            "sampling_params.stop: must be a string, a list of strings or a list of token ids",
            field="sampling_params.stop",
        )
    max_tokens = raw.get("max_tokens")
    temperature = raw.get("temperature", 1.0)
    require(
        isinstance(temperature, int | float) and math.isfinite(float(temperature)),
        "sampling_params.temperature",
        "must be a finite number ≥ 0",
    )
    return SamplingParams(
        max_tokens=int(max_tokens) if max_tokens is not None else 16,
        temperature=float(temperature),
        top_p=float(raw.get("top_p", 1.0)),
        top_k=int(raw.get("top_k", -1)),
        seed=int(raw["seed"]) if raw.get("seed") is not None else None,
        stop=tuple(stop) if stop is not None else None,
    )
