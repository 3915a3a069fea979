"""The SDK 0.38 scoring options below the HTTP layer: decoding `target_prompt_logprobs` (dense and sparse CSR
with pad -1), validation naming the field, `prompt_logprobs_last_n` masking and top-k rows."""

from __future__ import annotations

import math

import pytest
import torch
from tinker import types

from treadle.api.tinker.codec import target_ids
from treadle.engine import prompt_extras
from treadle.engine.types import SampleRequest, SamplingParams
from treadle.errors import UserError


def _wire(td: types.TensorData) -> dict[str, object]:
    """The JSON the SDK sends for a TensorData (its `_tensor_data_to_model`)."""
    return {
        "data": [int(x) for x in td.data],
        "dtype": td.dtype,
        "shape": td.shape,
        "sparse_crow_indices": td.sparse_crow_indices,
        "sparse_col_indices": td.sparse_col_indices,
    }


def test_target_ids_dense_and_sparse_agree() -> None:
    ids = torch.full((5, 3), -1, dtype=torch.long)
    ids[0, 0], ids[2, 1], ids[4, 2], ids[3, 0] = 7, 0, 99, 12
    dense = target_ids(_wire(types.TensorData.from_torch(ids)))
    sparse_td = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert sparse_td.sparse_crow_indices is not None  # really sent sparse
    sparse = target_ids(_wire(sparse_td))
    assert dense is not None and sparse is not None
    assert torch.equal(dense, ids) and torch.equal(sparse, ids)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": [1.5], "dtype": "float32", "shape": [1, 1]}, "int64"),
        ({"data": [1, 2], "dtype": "int64", "shape": [2]}, "2-D"),
        ({"data": [1, 2, 3], "dtype": "int64", "shape": [2, 2]}, "does not match shape"),
        ("x", "TensorData"),
    ],
)
def test_target_ids_bad_input_names_the_field(raw: object, message: str) -> None:
    with pytest.raises(UserError, match=f"target_prompt_logprobs.*{message}"):
        target_ids(raw)


def _req(**kw: object) -> SampleRequest:
    return SampleRequest(None, [1, 2, 3, 4, 5], SamplingParams(max_tokens=1), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"prompt_logprobs_last_n": 2}, "requires prompt_logprobs"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 5}, r"1\.\.4"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 0}, r"1\.\.4"),
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs"),
        ({"prompt_alt_tokens_k": 10_000}, "prompt_alt_tokens_k"),
        ({"target_prompt_logprobs": torch.zeros(5, 2, dtype=torch.long)}, r"\[4, K\]"),
        ({"target_prompt_logprobs": torch.full((4, 2), 500, dtype=torch.long)}, "0..99"),
        ({"target_prompt_logprobs": torch.full((4, 2), -2, dtype=torch.long)}, "-1"),
        ({"target_prompt_logprobs": torch.zeros(4, 2)}, "int64"),
    ],
)
def test_validation_names_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(UserError, match=field):
        prompt_extras.validate(_req(**kw), vocab_size=100)


def test_last_n_masks_earlier_positions() -> None:
    req = _req(prompt_logprobs=True, prompt_logprobs_last_n=2)
    lps = [math.nan, -1.0, -2.0, -3.0, -4.0]
    topk = [[], [(1, -1.0)], [(2, -2.0)], [(3, -3.0)], [(4, -4.0)]]
    out_lp, out_topk = prompt_extras.keep_last_n(req, lps, topk)
    assert out_lp is not None and out_topk is not None
    assert all(math.isnan(x) for x in out_lp[:3]) and out_lp[3:] == [-3.0, -4.0]
    assert out_topk == [[], [], [], [(3, -3.0)], [(4, -4.0)]]


def test_topk_rows_per_request_k() -> None:
    lp = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]]), dim=-1)
    rows = prompt_extras.topk_rows(lp, [2, 0])
    assert rows[1] is None and rows[0] is not None
    assert [t for t, _ in rows[0]] == [1, 3]
    assert rows[0][0][1] == pytest.approx(float(lp[0, 1]))


def test_extras_rows_follow_the_prompt() -> None:
    g = torch.Generator().manual_seed(0)
    lp_T_V = torch.log_softmax(torch.randn(4, 10, generator=g), dim=-1)
    ids = torch.tensor([[3, -1], [0, 9], [-1, -1], [5, 5]])
    req = _req(target_prompt_logprobs=ids, prompt_alt_tokens_k=3)
    acc = prompt_extras.PromptExtras()
    acc.add(req, 1, lp_T_V[:2], 0)  # a chunked prefill: rows 0..1, then 2..3
    acc.add(req, 1, lp_T_V[2:], 2)
    target = acc.target()
    assert target is not None
    want = torch.where(ids >= 0, lp_T_V.gather(1, ids.clamp(min=0)), torch.zeros(4, 2))
    torch.testing.assert_close(target, want)
    alt = acc.alt_tokens()
    assert alt is not None and alt[0].shape == (4, 3)
    torch.testing.assert_close(alt[1], lp_T_V.gather(1, alt[0]))
