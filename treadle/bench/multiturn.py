"""Multi-turn RL rollouts (issue 10): E concurrent episodes × T turns through the official SDK against a
`treadle serve` subprocess, each turn's prompt = the previous prompt + its sampled tokens + a ~20-token env reply
(chat-formatted, as the cookbook's multi-turn envs render them). Reports generated and prompt tokens/s and the
prefix-cache hit rate (the server's `prompt_cache_hit_tokens` over prompt tokens), retained prefix cache on vs
`--no-prefix-retention` in the same run, and a profile of the same rollout in-process (prefill vs decode vs the
rest) to say what dominates; the SDK-to-in-process gap is the HTTP and service path.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from treadle.bench.runner import Row

# The cookbook's guess_number recipe samples at most 64 tokens per turn at temperature 1.
EPISODES, TURNS, MAX_TOKENS = 16, 4, 64
QUICK = (8, 3, 16)
SYSTEM = (
    "You are playing a guessing game. I am thinking of an integer between 0 and 1000. Each turn, answer "
    "with one integer and nothing else; I will tell you whether it is too high or too low."
)

# prompt tokens, seed -> (sampled tokens, prompt_cache_hit_tokens)
SampleFn = Callable[[list[int], int], tuple[list[int], int]]


@dataclasses.dataclass
class Workload:
    """Every token the episodes send that does not come from the model (tokenized once, used by every run)."""

    first: list[list[int]]  # per episode: system + user message + the assistant header
    replies: list[list[list[int]]]  # per episode, per turn: the env's reply and the next assistant header
    end: int  # the end-of-turn token, added before a reply when the sample did not end with it
    max_tokens: int


def _workload(tok: Any, episodes: int, turns: int, max_tokens: int) -> Workload:
    def chat(role: str, text: str) -> str:
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"

    rng = random.Random(0)
    first, replies = [], []
    for e in range(episodes):
        user = f"Game {e}: make your first guess."
        first.append(tok.encode(chat("system", SYSTEM) + chat("user", user) + "<|im_start|>assistant\n"))
        ep = []
        for t in range(turns):
            lo, hi = sorted(rng.sample(range(1000), 2))
            text = (
                f"Guess {t + 1} was too {rng.choice(['high', 'low'])}. The number is between {lo} and {hi}."
            )
            ep.append(tok.encode("\n" + chat("user", text) + "<|im_start|>assistant\n"))
        replies.append(ep)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return Workload(first, replies, int(end), max_tokens)


@dataclasses.dataclass
class Rollout:
    seconds: float
    generated: int
    prompt: int
    hit: int

    @property
    def hit_rate(self) -> float:
        return self.hit / self.prompt if self.prompt else 0.0


def _rollout(w: Workload, sample: SampleFn) -> Rollout:
    """Every episode on its own thread (as the cookbook's async rollouts keep all episodes in flight)."""
    lock = threading.Lock()
    totals = [0, 0, 0]

    def episode(e: int) -> None:
        prompt = list(w.first[e])
        for t, reply in enumerate(w.replies[e]):
            tokens, hit = sample(prompt, 1000 * e + t)
            with lock:
                totals[0] += len(tokens)
                totals[1] += len(prompt)
                totals[2] += hit
            prompt = prompt + tokens + ([] if tokens and tokens[-1] == w.end else [w.end]) + reply

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(w.first)) as ex:
        list(ex.map(episode, range(len(w.first))))
    return Rollout(time.perf_counter() - t0, *totals)


def _sdk_rollouts(
    model: str, episodes: int, turns: int, max_tokens: int, retain: bool, w: Workload | None
) -> tuple[Workload, Rollout]:
    """The workload (tokenized on the first call) and one rollout through the SDK against a fresh server."""
    import tinker
    from tinker import types

    from treadle.bench.api import _start_server

    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = _start_server(model, data_dir, () if retain else ("--no-prefix-retention",))
        try:
            service = tinker.ServiceClient(
                base_url=url, api_key=os.environ.get("TINKER_API_KEY", "tml-bench")
            )
            tc = service.create_lora_training_client(base_model=model, rank=16).result()
            if w is None:
                w = _workload(tc.get_tokenizer(), episodes, turns, max_tokens)
            sc = tc.save_weights_and_get_sampling_client().result()  # a snapshot, as an RL loop samples

            def sample(prompt: list[int], seed: int) -> tuple[list[int], int]:
                params = types.SamplingParams(max_tokens=w.max_tokens, temperature=1.0, seed=seed)
                res = sc.sample(types.ModelInput.from_ints(prompt), 1, params).result()
                return list(res.sequences[0].tokens), int(res.prompt_cache_hit_tokens)

            sample(w.first[0][:8], 0)  # warm-up: allocation, first-call costs
            return w, _rollout(w, sample)
        finally:
            proc.terminate()
            proc.wait(30)


def _in_process(model: str, w: Workload, retain: bool) -> tuple[Rollout, dict[str, float]]:
    """The same rollout on an in-process engine: where the time goes (prefill, decode, the rest), no HTTP."""
    from treadle.engine.engine import Engine
    from treadle.engine.types import LoraConfig, SampleRequest, SamplingParams

    engine = Engine(model, max_lora_rank=16, prefix_retention=retain)
    try:
        engine.create_adapter("train", LoraConfig(rank=16))
        engine.snapshot_adapter("train", "snap")

        def sample(prompt: list[int], seed: int) -> tuple[list[int], int]:
            params = SamplingParams(max_tokens=w.max_tokens, temperature=1.0, seed=seed)
            res = engine.generate(SampleRequest("snap", prompt, params))
            return list(res.sequences[0].tokens), res.prompt_cache_hit_tokens

        sample(w.first[0][:8], 0)
        s = engine.sampler.stats
        p0, d0, pt0 = s.prefill_seconds, s.decode_seconds, s.prefill_tokens
        r = _rollout(w, sample)
        profile = {
            "prefill_s": s.prefill_seconds - p0,
            "decode_s": s.decode_seconds - d0,
            "rest_s": r.seconds - (s.prefill_seconds - p0) - (s.decode_seconds - d0),
            "prefilled_tokens": s.prefill_tokens - pt0,
        }
    finally:
        engine.close()
    return r, profile


def _line(where: str, retain: bool, r: Rollout) -> str:
    return (
        f"{where}, prefix retention {'on' if retain else 'off'}: {r.seconds:.1f} s, "
        f"{r.generated / r.seconds:.0f} generated tok/s, {r.prompt / r.seconds:.0f} prompt tok/s, "
        f"hit rate {r.hit_rate:.0%} ({r.hit}/{r.prompt} prompt tokens)"
    )


def bench_multiturn(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    episodes, turns, max_tokens = QUICK if quick else (EPISODES, TURNS, MAX_TOKENS)
    repeats = 1 if quick else 2
    # This process runs no torch compute while a server runs (so no thread cap here: both servers and the
    # in-process runs below see the same, uncapped environment). On and off alternate; the best of each counts.
    w: Workload | None = None
    sdk: dict[bool, list[Rollout]] = {True: [], False: []}
    for _ in range(repeats):
        for retain in (True, False):
            w, r = _sdk_rollouts(model, episodes, turns, max_tokens, retain, w)
            sdk[retain].append(r)
            print(_line("SDK", retain, r))
    assert w is not None
    local = {retain: _in_process(model, w, retain) for retain in (True, False)}
    for retain, (r, prof) in local.items():
        print(
            _line("in-process", retain, r) + f"; prefill {prof['prefill_s']:.1f} s "
            f"({prof['prefilled_tokens']:.0f} tokens), decode {prof['decode_s']:.1f} s, rest {prof['rest_s']:.1f} s"
        )
    on, off = (min(sdk[x], key=lambda r: r.seconds) for x in (True, False))
    lon, loff = local[True][0], local[False][0]
    label = f"{episodes}x{turns} turns"
    rows = [
        Row(f"SDK multi-turn {label}: retained vs off, gen", on.generated / on.seconds,
            off.generated / off.seconds, "tok/s", 1.1),
        Row(f"SDK multi-turn {label}: retained vs off, prompt", on.prompt / on.seconds,
            off.prompt / off.seconds, "tok/s", 1.1),
        Row(f"in-process multi-turn {label}: retained vs off", lon.generated / lon.seconds,
            loff.generated / loff.seconds, "tok/s", 1.1),
        Row(f"multi-turn {label} retained: SDK vs in-process", 1 / on.seconds, 1 / lon.seconds, "1/s", 0.9),
    ]  # fmt: skip
    extra: dict[str, object] = {
        "workload": {"episodes": episodes, "turns": turns, "max_tokens": max_tokens, "repeats": repeats},
        "sdk": {
            ("on" if x else "off"): [dataclasses.asdict(r) | {"hit_rate": r.hit_rate} for r in rs]
            for x, rs in sdk.items()
        },
        "in_process": {
            ("on" if x else "off"): dataclasses.asdict(r) | {"hit_rate": r.hit_rate, "profile": prof}
            for x, (r, prof) in local.items()
        },
    }
    return rows, extra
