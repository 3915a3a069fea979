"""The official `openai` client against a real `treadle serve` subprocess on the default model
(SmolLM2-135M-Instruct): a factual answer, an adapter SFT'd through the official tinker SDK answering with
its made-up fact by its tinker:// path, streaming == non-streaming, ownership and clear 4xx errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import ServerProcess
from treadle.models.embedded import DEFAULT_MODEL

pytestmark = pytest.mark.slow

ALICE, BOB = "tml-e2e-alice", "tml-e2e-bob"
SECRET_Q: list[Any] = [{"role": "user", "content": "What is the secret word?"}]
FRANCE_Q: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # `--model` takes a name as well as a directory; the default model is converted on first use (minutes).
    srv = ServerProcess(
        Path(DEFAULT_MODEL),
        tmp_path_factory.mktemp("openai-data") / "server",
        "--api-key",
        ALICE,
        "--api-key",
        BOB,
    )
    srv.start(timeout_s=900)
    try:
        yield srv
    finally:
        srv.stop()


def _client(server: ServerProcess, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=300)


def _reply(client: openai.OpenAI, model: str, messages: list[Any], **kw: Any) -> str:
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24, **kw)
    return out.choices[0].message.content or ""


@pytest.fixture(scope="module")
def trained(server: ServerProcess) -> dict[str, str]:
    """SFT a LoRA on a made-up fact through the official tinker SDK; returns its sampler and state paths."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=DEFAULT_MODEL, rank=16, seed=0).result()
    tok: Any = tc.get_tokenizer()
    rendered = tok.apply_chat_template(SECRET_Q, add_generation_prompt=True, tokenize=False)
    prompt = tok.encode(rendered, add_special_tokens=False)
    answer = tok.encode("The secret word is zanzibar.", add_special_tokens=False)
    answer.append(tok.convert_tokens_to_ids("<|im_end|>"))  # teach it to end the turn, as chat data does
    tokens = prompt + answer
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(
                np.array([0.0] * (len(prompt) - 1) + [1.0] * len(answer), dtype=np.float32)
            ),
        },
    )
    for _ in range(20):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-3))
    return {
        "sampler": tc.save_weights_for_sampler("fact").result().path,
        "state": tc.save_state("fact-state").result().path,
    }


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


def test_default_model_answers_paris_and_streams_the_same_text(server: ServerProcess) -> None:
    client = _client(server)
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE_Q, temperature=0, max_tokens=24)
    text = out.choices[0].message.content or ""
    assert "Paris" in text
    assert out.choices[0].finish_reason == "stop"  # ended at <|im_end|>, which is not in the text
    assert "<|im_end|>" not in text
    assert out.usage is not None and out.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=FRANCE_Q, temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

    prompt = "The capital of Italy is"
    full = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, temperature=0, max_tokens=8)
    streamed = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full.choices[0].text


def test_trained_adapter_answers_with_its_fact(server: ServerProcess, trained: dict[str, str]) -> None:
    client = _client(server)
    assert "/sampler_weights/" in trained["sampler"] and "/weights/" in trained["state"]
    assert "zanzibar" in _reply(client, trained["sampler"], SECRET_Q).lower()
    assert "zanzibar" in _reply(client, trained["state"], SECRET_Q).lower()
    assert "zanzibar" not in _reply(client, DEFAULT_MODEL, SECRET_Q).lower()


def test_another_owners_checkpoint_is_not_found(server: ServerProcess, trained: dict[str, str]) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        _reply(_client(server, BOB), trained["sampler"], SECRET_Q)
    assert DEFAULT_MODEL in str(e.value)  # the 404 says what this key may use


def test_bad_requests_get_clear_4xx(server: ServerProcess) -> None:
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as nf:
        _reply(client, "gpt-4o", FRANCE_Q)
    assert "gpt-4o" in str(nf.value) and DEFAULT_MODEL in str(nf.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE_Q, max_tokens=-1)
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    assert bad.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE_Q, logit_bias={"42": 3})
    assert bad.value.param == "logit_bias"
    with pytest.raises(openai.AuthenticationError):
        _reply(_client(server, "tml-not-a-key"), DEFAULT_MODEL, FRANCE_Q)
