"""The continuous-batching sampler on a tiny random-init llama: greedy vs a no-cache loop, logprobs vs forward,
seeds, stops, prefix sharing, LoRA rows, concurrency, validation and shutdown."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from tests.small_models import load_small, write_small_checkpoint
from treadle import ops
from treadle.engine.compute import ComputeThread
from treadle.engine.sampler import Sampler
from treadle.engine.types import SampleRequest, SamplingParams
from treadle.errors import TreadleError, UserError
from treadle.models import CausalLM, LoraHook

EOS = 2
MAX_CTX = 96


@contextlib.contextmanager
def held(compute: ComputeThread) -> Iterator[None]:
    """Keep `compute` busy (between two sampler steps) until the block ends."""
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(60)

    compute.submit(hold)
    assert started.wait(60)
    try:
        yield
    finally:
        gate.set()


def decode(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


class BoostLora:
    """Test-only LoRA hook: rows whose adapter is "boost" get +`amount` on `token`'s logit (an lm_head delta)."""

    def __init__(self, boosted_rows: list[int], token: int, amount: float = 50.0) -> None:
        self.rows, self.token, self.amount = boosted_rows, token, amount

    def delta(self, key: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        if key != "lm_head":
            return None
        out = x.new_zeros(*x.shape[:-1], 128)
        out[self.rows, ..., self.token] = self.amount
        return out


def boost_hook(adapter_ids: Sequence[str | None]) -> LoraHook | None:
    rows = [b for b, a in enumerate(adapter_ids) if a == "boost"]
    return BoostLora(rows, token=7) if rows else None


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    d = write_small_checkpoint(
        tmp_path_factory.mktemp("ckpt"),
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked distributions, so greedy choices are far from ties
    )
    return load_small(d)


@pytest.fixture
def sampler(model: CausalLM) -> Iterator[Sampler]:
    s = Sampler(
        model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX, decode=decode, max_batch_size=16
    )
    yield s
    s.close()


def req(prompt: list[int], n: int = 1, adapter: str | None = None, **params: object) -> SampleRequest:
    return SampleRequest(adapter, prompt, SamplingParams(**params), num_samples=n)  # type: ignore[arg-type]


def forward_logprobs(model: CausalLM, tokens: list[int], hook: LoraHook | None = None) -> torch.Tensor:
    """logprobs[t] of tokens[t] given tokens[:t] from one full-sequence forward (index 0 unused)."""
    with torch.no_grad():
        lp_T_V = model.logprobs(model(torch.tensor([tokens])), hook)[0]
    out = torch.full((len(tokens),), math.nan)
    out[1:] = lp_T_V[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return out


def greedy_no_cache(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            toks.append(int(model.logits(model(torch.tensor([toks])))[0, -1].argmax()))
    return toks[len(prompt) :]


PROMPTS = [[5, 9, 11, 3], [17, 4], [40, 41, 42, 43, 44, 45, 46], [99], [12, 13, 14, 15, 16]]


def test_greedy_matches_no_cache_loop(model: CausalLM, sampler: Sampler) -> None:
    futs = [sampler.submit(req(p, max_tokens=12, temperature=0.0, stop=())) for p in PROMPTS]
    for p, f in zip(PROMPTS, futs, strict=True):
        seq = f.result().sequences[0]
        assert seq.tokens == greedy_no_cache(model, p, 12)
        assert seq.stop_reason == "length"


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.0),
    ],
)
def test_sampled_logprobs_equal_forward(model: CausalLM, sampler: Sampler, params: dict[str, Any]) -> None:
    futs = [sampler.submit(req(p, n=2, max_tokens=10, stop=(), seed=3, **params)) for p in PROMPTS]
    for p, f in zip(PROMPTS, futs, strict=True):
        for seq in f.result().sequences:
            ref = forward_logprobs(model, p + seq.tokens)[len(p) :]
            assert torch.allclose(torch.tensor(seq.logprobs), ref, atol=1e-4), (seq.logprobs, ref)


def test_prompt_logprobs_equal_forward(model: CausalLM, sampler: Sampler) -> None:
    prompt = PROMPTS[2]
    r = SampleRequest(
        None, prompt, SamplingParams(max_tokens=1), prompt_logprobs=True, topk_prompt_logprobs=3
    )
    res = sampler.generate(r)
    assert res.prompt_logprobs is not None and res.topk_prompt_logprobs is not None
    assert len(res.prompt_logprobs) == len(prompt) and math.isnan(res.prompt_logprobs[0])
    ref = forward_logprobs(model, prompt)
    assert torch.allclose(torch.tensor(res.prompt_logprobs[1:]), ref[1:], atol=1e-5)
    with torch.no_grad():
        lp_T_V = model.logprobs(model(torch.tensor([prompt])))[0]
    assert res.topk_prompt_logprobs[0] == []
    for t in range(1, len(prompt)):
        vals, ids = lp_T_V[t - 1].topk(3)
        assert [tok for tok, _ in res.topk_prompt_logprobs[t]] == ids.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in res.topk_prompt_logprobs[t]]), vals, atol=1e-5)


def test_seeds(sampler: Sampler) -> None:
    prompt = [3, 1, 4, 1, 5]
    a = sampler.generate(req(prompt, n=4, max_tokens=16, stop=(), seed=42))
    b = sampler.generate(req(prompt, n=4, max_tokens=16, stop=(), seed=42))
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) == 4  # samples of one request differ
    c = sampler.generate(req(prompt, n=1, max_tokens=16, stop=(), seed=43))
    assert c.sequences[0].tokens != a.sequences[0].tokens
    unseeded = [sampler.generate(req(prompt, max_tokens=16, stop=())).sequences[0].tokens for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_batch_mates_do_not_change_samples(sampler: Sampler) -> None:
    target = req([8, 6, 7, 5, 3, 0, 9], max_tokens=20, stop=(), seed=7, temperature=1.0)
    alone = sampler.generate(target).sequences[0].tokens
    others = [req([20 + i, 30 + i, i], n=2, max_tokens=5 + 3 * i, stop=(), seed=i) for i in range(7)]
    futs = (
        [sampler.submit(o) for o in others[:4]]
        + [sampler.submit(target)]
        + [sampler.submit(o) for o in others[4:]]
    )
    assert futs[4].result().sequences[0].tokens == alone
    for f in futs:
        f.result()


def test_stops(sampler: Sampler) -> None:
    prompt = [10, 20, 30]
    free = sampler.generate(req(prompt, max_tokens=20, temperature=0.0, stop=())).sequences[0].tokens
    assert len(free) == 20
    k = next(i for i in range(2, 20) if free[i] not in free[:i])  # a token seen first at position k
    by_id = sampler.generate(req(prompt, max_tokens=20, temperature=0.0, stop=(free[k],))).sequences[0]
    assert by_id.tokens == free[: k + 1] and by_id.stop_reason == "stop"
    # a stop string spanning two tokens: the sequence ends with (and includes) both
    text = f"{free[k - 1]}><{free[k]}"
    by_str = sampler.generate(req(prompt, max_tokens=20, temperature=0.0, stop=(text,))).sequences[0]
    assert by_str.tokens == free[: k + 1] and by_str.stop_reason == "stop"
    # stop=None → EOS: with EOS set to the k-th token's id in a fresh sampler
    eos_sampler = Sampler(sampler.model, boost_hook, eos_token_ids=[free[k]], max_context_length=MAX_CTX)
    try:
        by_eos = eos_sampler.generate(req(prompt, max_tokens=20, temperature=0.0)).sequences[0]
        no_stop = eos_sampler.generate(req(prompt, max_tokens=20, temperature=0.0, stop=())).sequences[0]
    finally:
        eos_sampler.close()
    assert by_eos.tokens == free[: k + 1] and by_eos.stop_reason == "stop"
    assert no_stop.tokens == free and no_stop.stop_reason == "length"
    # the stop token drawn as the very last allowed token still counts as "stop"
    last = sampler.generate(req(prompt, max_tokens=k + 1, temperature=0.0, stop=(free[k],))).sequences[0]
    assert last.stop_reason == "stop"


def test_top_k_1_and_tiny_top_p_are_greedy(sampler: Sampler) -> None:
    for p in PROMPTS:
        greedy = sampler.generate(req(p, max_tokens=10, temperature=0.0, stop=())).sequences[0].tokens
        k1 = sampler.generate(req(p, n=2, max_tokens=10, temperature=1.5, top_k=1, stop=(), seed=1)).sequences
        p0 = sampler.generate(
            req(p, n=2, max_tokens=10, temperature=1.5, top_p=1e-6, stop=(), seed=1)
        ).sequences
        assert all(s.tokens == greedy for s in k1 + p0)


def test_continuous_batching_from_threads(model: CausalLM, sampler: Sampler) -> None:
    expected = {tuple(p): greedy_no_cache(model, p, 6 + len(p)) for p in PROMPTS}
    results: list[tuple[list[int], list[int]]] = []
    mu = threading.Lock()

    def client(offset: int) -> None:
        for i in range(len(PROMPTS)):
            p = PROMPTS[(i + offset) % len(PROMPTS)]
            toks = (
                sampler.generate(req(p, max_tokens=6 + len(p), temperature=0.0, stop=())).sequences[0].tokens
            )
            with mu:
                results.append((p, toks))

    threads = [threading.Thread(target=client, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 * len(PROMPTS)
    for p, toks in results:
        assert toks == expected[tuple(p)]


def test_num_samples_prefill_once(sampler: Sampler) -> None:
    prompt = list(range(30, 50))
    before = sampler.stats.prefill_tokens
    res = sampler.generate(req(prompt, n=6, max_tokens=4, stop=(), seed=5))
    assert len(res.sequences) == 6
    assert sampler.stats.prefill_tokens - before == len(prompt)


def test_samples_beyond_batch_size(model: CausalLM) -> None:
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX, max_batch_size=3)
    try:
        seeded = req([1, 2, 3], n=8, max_tokens=5, stop=(), seed=11)
        many = s.generate(seeded)
        # the same samples as a roomy sampler would draw: sample i depends only on (seed, i)
        roomy = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX, max_batch_size=16)
        try:
            ref = roomy.generate(seeded)
        finally:
            roomy.close()
    finally:
        s.close()
    assert [q.tokens for q in many.sequences] == [q.tokens for q in ref.sequences]


def test_concurrent_common_prefix_prefilled_once(model: CausalLM) -> None:
    compute = ComputeThread()
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX, compute=compute)
    shared = list(range(60, 80))
    a_prompt, b_prompt = shared + [1, 2], shared + [3]
    try:
        with held(compute):  # the compute thread cannot start `a` before `b` is queued
            fa = s.submit(req(a_prompt, max_tokens=8, temperature=0.0, stop=()))
            fb = s.submit(req(b_prompt, max_tokens=8, temperature=0.0, stop=()))
            fc = s.submit(req(b_prompt, adapter="boost", max_tokens=8, temperature=0.0, stop=()))
        a, b, c = fa.result(), fb.result(), fc.result()
    finally:
        s.close()
        compute.close()
    assert a.prompt_cache_hit_tokens == 0
    assert b.prompt_cache_hit_tokens == len(shared)
    assert c.prompt_cache_hit_tokens == 0  # another adapter's KV is never reused
    assert s.stats.prefill_tokens == len(a_prompt) + 1 + len(b_prompt)
    assert b.sequences[0].tokens == greedy_no_cache(model, b_prompt, 8)
    assert c.sequences[0].tokens == [7] * 8


def test_lora_rows_in_mixed_batch(model: CausalLM, sampler: Sampler) -> None:
    prompt = [4, 5, 6]
    base = sampler.submit(req(prompt, max_tokens=6, temperature=0.0, stop=()))
    boosted = sampler.submit(
        req(prompt, adapter="boost", n=2, max_tokens=6, temperature=1.0, stop=(), seed=0)
    )
    assert base.result().sequences[0].tokens == greedy_no_cache(model, prompt, 6)
    for seq in boosted.result().sequences:
        assert seq.tokens == [7] * 6
        ref = forward_logprobs(model, prompt + seq.tokens, BoostLora([0], 7))[len(prompt) :]
        assert torch.allclose(torch.tensor(seq.logprobs), ref, atol=1e-4)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (SampleRequest(None, [], SamplingParams()), "prompt"),
        (SampleRequest(None, [1, 128], SamplingParams()), "prompt"),
        (SampleRequest(None, [-1], SamplingParams()), "prompt"),
        (SampleRequest(None, [1] * 90, SamplingParams(max_tokens=7)), "sampling_params.max_tokens"),
        (SampleRequest(None, [1], SamplingParams(), num_samples=0), "num_samples"),
        (SampleRequest(None, [1], SamplingParams(top_p=0.0)), "sampling_params.top_p"),
        (SampleRequest(None, [1], SamplingParams(temperature=-1.0)), "sampling_params.temperature"),
        (SampleRequest(None, [1], SamplingParams(stop=(500,))), "sampling_params.stop"),
        (SampleRequest(None, [1], SamplingParams(), topk_prompt_logprobs=-1), "topk_prompt_logprobs"),
    ],
)
def test_validation_errors(sampler: Sampler, bad: SampleRequest, field: str) -> None:
    with pytest.raises(UserError) as e:
        sampler.submit(bad)
    assert e.value.field == field and field in e.value.message


def test_string_stop_without_tokenizer_is_rejected(model: CausalLM) -> None:
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX)
    try:
        with pytest.raises(UserError, match="sampling_params.stop"):
            s.submit(req([1, 2], stop=("x",)))
        assert s.generate(req([1, 2], max_tokens=3, stop=(5,))).sequences  # still serving
    finally:
        s.close()


def test_close_fails_pending_futures(model: CausalLM) -> None:
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX)
    first, gate = threading.Event(), threading.Event()

    def hold_at_first_token(*_: object) -> None:
        if not first.is_set():
            first.set()
            gate.wait(30)

    # the request is mid-generation (its first token drawn) when close is called
    fut = s.submit(req([1, 2, 3], max_tokens=50, stop=()), on_token=hold_at_first_token)
    assert first.wait(30)
    closer = threading.Thread(target=s.close)
    closer.start()
    while not s.closed:
        closer.join(0.001)
    gate.set()
    closer.join()
    with pytest.raises(TreadleError, match="closed"):
        fut.result(timeout=0)
    with pytest.raises(TreadleError, match="closed"):
        s.submit(req([1]))


def test_failing_adapter_fails_only_its_request(model: CausalLM) -> None:
    def hook(ids: Sequence[str | None]) -> LoraHook | None:
        if "gone" in ids:
            raise UserError("model: adapter 'gone' is not loaded", field="model")
        return boost_hook(ids)

    s = Sampler(model, hook, eos_token_ids=[EOS], max_context_length=MAX_CTX)
    try:
        ok = s.submit(req([1, 2, 3], max_tokens=5, temperature=0.0, stop=()))
        bad = s.submit(req([1, 2, 3], adapter="gone", max_tokens=5, stop=()))
        with pytest.raises(UserError, match="gone"):
            bad.result()
        assert ok.result().sequences[0].tokens == greedy_no_cache(model, [1, 2, 3], 5)
    finally:
        s.close()


def test_futures_are_standard(sampler: Sampler) -> None:
    fut = sampler.submit(req([1, 2], max_tokens=2))
    assert isinstance(fut, concurrent.futures.Future)
    assert len(fut.result().sequences[0].tokens) <= 2


def test_round_of_new_prompts_is_prefilled_in_one_batch(model: CausalLM) -> None:
    compute = ComputeThread()
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX, compute=compute)
    try:
        with held(compute):  # everything is queued before the sampler's first step
            futs = [s.submit(req(p, max_tokens=6, temperature=0.0, stop=())) for p in PROMPTS]
        res = [f.result() for f in futs]
    finally:
        s.close()
        compute.close()
    assert s.stats.prefill_calls == 1
    assert s.stats.prefill_tokens == sum(len(p) for p in PROMPTS)
    for p, r in zip(PROMPTS, res, strict=True):  # ragged rows: padding is neither stored nor attended
        assert r.sequences[0].tokens == greedy_no_cache(model, p, 6)


def test_prompt_logprobs_with_many_samples(model: CausalLM, sampler: Sampler) -> None:
    prompt = [9, 8, 7, 6, 5, 4]
    before = sampler.stats.prefill_tokens
    r = SampleRequest(
        None, prompt, SamplingParams(max_tokens=3, seed=1, stop=()), num_samples=3, prompt_logprobs=True
    )
    res = sampler.generate(r)
    assert sampler.stats.prefill_tokens - before == len(prompt)
    assert res.prompt_logprobs is not None and res.topk_prompt_logprobs is None
    assert torch.allclose(
        torch.tensor(res.prompt_logprobs[1:]), forward_logprobs(model, prompt)[1:], atol=1e-5
    )
    assert len(res.sequences) == 3


def test_kv_cache_growth_keeps_contents() -> None:
    from treadle.engine.kv_cache import SlotKVCache

    c = SlotKVCache(
        2,
        1,
        4,
        max_slots=8,
        max_len=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
        initial_slots=1,
        initial_len=4,
    )
    k = torch.randn(1, 1, 3, 4)
    step = c.step([0], [0], [3])
    step.update(1, k, -k)
    step = c.step([5, 2], [1, 30], [2, 1])  # grows slots to 8 and length to 32
    assert c.num_slots == 8 and c.capacity == 32
    assert torch.equal(c.k[1, 0, :, :3], k[0]) and torch.equal(c.v[1, 0, :, :3], -k[0])
    # ragged rows: row 0 (2 tokens from 1) sees keys 0..1 then 0..2; row 1's padding query sees only its keys
    assert step.mask_B_T_S.shape == (2, 2, 31)
    assert step.mask_B_T_S[0].sum(-1).tolist() == [2, 3]
    assert step.mask_B_T_S[1].sum(-1).tolist() == [31, 31]
    k2 = torch.randn(2, 1, 2, 4)
    keys, _ = step.update(0, k2, k2)
    assert torch.equal(keys[0, :, 1:3], k2[0]) and torch.equal(keys[1, :, 30], k2[1, :, 0])
    assert torch.equal(c.k[0, 2, :, 31], torch.zeros(1, 4))  # row 1's padding was not stored
    c.copy_prefix(5, 6, 3)
    assert torch.equal(c.k[0, 6, :, :3], c.k[0, 5, :, :3])


def test_idle_sampler_releases_a_grown_cache(model: CausalLM) -> None:
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=4096, max_batch_size=8)
    try:
        res = s.generate(req(list(range(100)) * 30, max_tokens=2, temperature=0.0, stop=()))
        assert len(res.sequences[0].tokens) == 2
        # the worker shrinks the cache once idle; the next request still works from a small cache
        res2 = s.generate(req([1, 2, 3], max_tokens=4, temperature=0.0, stop=()))
    finally:
        s.close()
    assert s._cache.capacity < 3000  # pyright: ignore[reportPrivateUsage]
    assert res2.sequences[0].tokens == greedy_no_cache(model, [1, 2, 3], 4)


def test_batch_invariant_mode_is_bitwise(model: CausalLM) -> None:
    """Invariants 1 and 2 in batch-invariant mode: sampled and prompt logprobs equal a full forward bitwise,
    and batch-mates (one sharing the prompt's prefix, so the prompt's KV is copied, not computed) change no bit."""
    prompt = [5, 9, 11, 3, 7, 8, 1, 4, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]
    params = SamplingParams(max_tokens=20, seed=1, stop=())
    with ops.mode("batch_invariant"):
        compute = ComputeThread()
        s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX, compute=compute)
        try:
            alone = s.generate(SampleRequest(None, prompt, params, prompt_logprobs=True))
            mates = [req(prompt[:18] + [50], max_tokens=30, seed=9, stop=())]
            mates += [req([20 + i] * (i + 1), max_tokens=5 + i, seed=i, stop=()) for i in range(5)]
            with held(compute):  # the prefix-sharing mate is still running when the target is admitted
                futs = [s.submit(m) for m in mates[:3]]
                futs += [s.submit(SampleRequest(None, prompt, params))] + [s.submit(m) for m in mates[3:]]
            mixed = futs[3].result()
            for f in futs:
                f.result()
        finally:
            s.close()
            compute.close()
        seq = alone.sequences[0]
        toks = prompt + seq.tokens
        with torch.no_grad():
            lp_T_V = model.logprobs(model(torch.tensor([toks])))[0]
    ref = lp_T_V[:-1].gather(1, torch.tensor(toks[1:])[:, None])[:, 0]
    assert torch.equal(torch.tensor(seq.logprobs), ref[len(prompt) - 1 :])
    assert alone.prompt_logprobs is not None
    assert torch.equal(torch.tensor(alone.prompt_logprobs[1:]), ref[: len(prompt) - 1])
    assert mixed.prompt_cache_hit_tokens == 18
    assert mixed.sequences[0].tokens == seq.tokens and mixed.sequences[0].logprobs == seq.logprobs


def test_common_prefix_bisection() -> None:
    import random

    from treadle.engine.sampler import _common_prefix  # pyright: ignore[reportPrivateUsage]

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 30))]
        b = [rng.randint(0, 2) for _ in range(rng.randint(0, 30))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert _common_prefix(a, b) == n


def test_chunked_prefill(model: CausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny per-call token budget every prompt is prefilled in several chunks: same tokens, same
    prompt logprobs (chunk boundaries included) as one full forward."""
    import treadle.engine.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "_PREFILL_TOKENS", 6)
    long_prompt = [(7 * i + 3) % 128 for i in range(23)]
    s = Sampler(model, boost_hook, eos_token_ids=[EOS], max_context_length=MAX_CTX)
    try:
        scored = s.submit(
            SampleRequest(
                None,
                long_prompt,
                SamplingParams(max_tokens=5, temperature=0.0, stop=()),
                prompt_logprobs=True,
                topk_prompt_logprobs=2,
            )
        )
        others = [s.submit(req(p, max_tokens=5, temperature=0.0, stop=())) for p in PROMPTS]
        res = scored.result()
        for p, f in zip(PROMPTS, others, strict=True):
            assert f.result().sequences[0].tokens == greedy_no_cache(model, p, 5)
    finally:
        s.close()
    assert s.stats.prefill_calls >= 4
    assert res.sequences[0].tokens == greedy_no_cache(model, long_prompt, 5)
    assert res.prompt_logprobs is not None and res.topk_prompt_logprobs is not None
    ref = forward_logprobs(model, long_prompt)
    assert len(res.prompt_logprobs) == len(long_prompt) == len(res.topk_prompt_logprobs)
    assert torch.allclose(torch.tensor(res.prompt_logprobs[1:]), ref[1:], atol=1e-5)
    assert all(len(t) == 2 for t in res.topk_prompt_logprobs[1:])
