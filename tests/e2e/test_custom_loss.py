"""Server-side custom losses through the official SDK against a real `treadle serve`: `create_custom_loss`
uploads the traced graph, `forward_backward_custom(data, handle)` runs it on the server in one pass, and the
result (loss, metrics, per-datum logprobs, and the gradient, seen through one optimizer step) matches the SDK's
client-side `forward_backward_custom` with the same function. Also: a refused graph, a foreign loss id, zstd."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
import torch.nn.functional as F
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

SEQ = [1, 17, 42, 99, 7, 30, 12, 5, 64, 3, 88]


def _td(xs: list[float] | list[int], dtype: type) -> types.TensorData:
    return types.TensorData.from_numpy(np.array(xs, dtype=dtype))


def dpo_style(logprobs, ref_logprobs, chosen, rejected):  # noqa: ANN001, ANN201 - traced by torch.fx
    # one datum holds a chosen and a rejected completion; masks pick each, the reference is a fixed policy
    delta = logprobs - ref_logprobs
    margin = 0.5 * ((delta * chosen).sum() - (delta * rejected).sum())
    loss = -F.logsigmoid(margin)
    return loss, {"custom/margin:mean": margin.detach(), "custom/win:mean": (margin > 0).float()}


def kl_to_reference(logprobs, ref_logprobs, weights):  # noqa: ANN001, ANN201
    # k3 estimator of KL(policy || reference) on the weighted tokens, plus an SFT term
    log_ratio = ref_logprobs - logprobs
    kl = (torch.exp(log_ratio) - log_ratio - 1.0) * weights
    nll = -(logprobs * weights).sum()
    return nll + 0.1 * kl.sum(), {"custom/kl:sum": kl.sum().detach()}


def topk_distill(logprobs, teacher_logits, scale):  # noqa: ANN001, ANN201
    # rank-2 logprobs ([T, K] targets) against a teacher distribution, times a per-datum scalar
    p = torch.softmax(teacher_logits, dim=-1)
    loss = -(p * logprobs).sum() * scale
    return loss, {"custom/tokens:sum": torch.ones_like(scale) * logprobs.shape[0]}


def _topk_data() -> list[types.Datum]:
    n, k = len(SEQ) - 1, 3
    targets = np.stack(
        [np.array(SEQ[1:]), (np.array(SEQ[1:]) + 5) % 100, (np.array(SEQ[1:]) + 9) % 100], axis=1
    )
    teacher = np.linspace(-1.0, 1.0, n * k, dtype=np.float32).reshape(n, k)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(SEQ[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(targets.astype(np.int64)),
                "teacher_logits": types.TensorData.from_numpy(teacher),
                "scale": types.TensorData.from_numpy(np.array(0.5, dtype=np.float32)),
            },
        )
    ]


def _dpo_data() -> list[types.Datum]:
    n = len(SEQ) - 1
    chosen = [0.0] * 2 + [1.0] * 4 + [0.0] * (n - 6)
    rejected = [0.0] * 6 + [1.0] * (n - 6)
    out = []
    for shift in (0, 3):
        toks = [(t + shift) % 100 for t in SEQ]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(toks[:-1]),
                loss_fn_inputs={
                    "target_tokens": _td(toks[1:], np.int64),
                    "ref_logprobs": _td([-4.0 - 0.1 * i for i in range(n)], np.float32),
                    "chosen": _td(chosen, np.float32),
                    "rejected": _td(rejected, np.float32),
                },
            )
        )
    return out


def _kl_data() -> list[types.Datum]:
    n = len(SEQ) - 1
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(SEQ[:-1]),
            loss_fn_inputs={
                "target_tokens": _td(SEQ[1:], np.int64),
                "ref_logprobs": _td([-4.5 + 0.05 * i for i in range(n)], np.float32),
                "weights": _td([0.0] * 3 + [1.0] * (n - 3), np.float32),
            },
        )
    ]


def _per_datum(fn):  # noqa: ANN001, ANN202 - the same function as a client-side (data, logprobs) loss
    def loss(data: list[types.Datum], logprobs_list: list[torch.Tensor]):  # noqa: ANN202
        total, sums = None, {}
        names = fn.__code__.co_varnames[1 : fn.__code__.co_argcount]
        for d, lp in zip(data, logprobs_list, strict=True):
            value, metrics = fn(lp, *[d.loss_fn_inputs[k].to_torch() for k in names])
            total = value if total is None else total + value
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return total, {k: v / len(data) if k.endswith(":mean") else v for k, v in sums.items()}

    return loss


@pytest.fixture(scope="module")
def sc(tinker_server: ServerProcess) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)


@pytest.mark.parametrize(
    ("fn", "ranks", "data"),
    [
        (dpo_style, {"logprobs": 1, "ref_logprobs": 1, "chosen": 1, "rejected": 1}, _dpo_data),
        (kl_to_reference, {"logprobs": 1, "ref_logprobs": 1, "weights": 1}, _kl_data),
        (topk_distill, {"logprobs": 2, "teacher_logits": 2, "scale": 0}, _topk_data),
    ],
)
def test_server_side_matches_client_side(
    sc: tinker.ServiceClient, tinker_server: ServerProcess, fn, ranks, data
):  # noqa: ANN001
    handle = sc.create_custom_loss(fn, input_ranks=ranks).result()
    assert handle.loss_id is not None  # the server advertised custom_loss_server_side and stored it
    server = sc.create_lora_training_client(base_model=tinker_server.model, rank=4, seed=7).result()
    client = sc.create_lora_training_client(base_model=tinker_server.model, rank=4, seed=7).result()
    batch = data()
    a = server.forward_backward_custom(batch, handle).result()
    b = client.forward_backward_custom(batch, _per_datum(fn)).result()
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5, abs=1e-6)
    for key in b.metrics:
        if key.startswith("custom/"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5, abs=1e-6)
    for out_a, out_b in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(out_a["logprobs"].to_numpy(), out_b["logprobs"].to_numpy(), atol=1e-6)
    # Same gradients ⇒ the same update: plain SGD-like behaviour is not available, so compare after one Adam
    # step (its first step moves each weight by lr·sign(g)), then score a probe with both adapters.
    adam = types.AdamParams(learning_rate=1e-2)
    server.optim_step(adam).result()
    client.optim_step(adam).result()
    probe = [
        types.Datum(
            model_input=batch[0].model_input,
            loss_fn_inputs={"target_tokens": batch[0].loss_fn_inputs["target_tokens"]},
        )
    ]
    la = server.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    lb = client.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    before = a.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.abs(la - before).max() > 1e-4  # the step changed the adapter
    np.testing.assert_allclose(la, lb, atol=1e-4)


def test_refused_graph_names_the_construct(sc: tinker.ServiceClient, tinker_server: ServerProcess) -> None:
    # The SDK's own tracer refuses most constructs before upload; send a graph it would never produce
    # straight to the route, as any HTTP client could.
    import httpx

    session = sc.holder.get_session_id()
    graph = {
        "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
            {"op": "call_function", "name": "p", "target": "builtins.open", "args": ["/etc/passwd"]},
            {
                "op": "output",
                "name": "output",
                "target": "output",
                "args": [{"tuple": [{"ref": "p"}, {"dict": {}}]}],
            },
        ]
    }
    r = httpx.post(
        f"{tinker_server.base_url}/api/v1/create_custom_loss",
        headers={"X-API-Key": API_KEY},
        json={
            "session_id": session,
            "custom_loss_seq_id": 999,
            "name": "evil",
            "inputs": [{"name": "logprobs", "rank": 1}],
            "graph": graph,
        },
    )
    assert r.status_code == 200
    res = httpx.post(
        f"{tinker_server.base_url}/api/v1/retrieve_future",
        headers={"X-API-Key": API_KEY},
        json={"request_id": r.json()["request_id"]},
        timeout=30,
    ).json()
    assert "builtins.open" in str(res) and "allow-list" in str(res), res


def test_unknown_loss_id_is_refused(sc: tinker.ServiceClient, tinker_server: ServerProcess) -> None:
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    with pytest.raises(tinker.NotFoundError, match="loss_id"):
        tc.forward_backward(_kl_data(), "custom", {"loss_id": "nope"}).result()
