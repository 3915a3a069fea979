"""The whole path a user takes: LoRA SFT and sampling through the official SDK → `treadle serve`, against the same
work in process and against the libraries a user would otherwise run (transformers + peft, `generate`).

Rows (issue 10's "SDK vs in-process" targets and what they imply against the libraries):
- SFT 8 × 128 tokens, rank 16, one forward_backward + optim_step per step: SDK vs in-process engine (≥ 0.95×)
  and SDK vs transformers + peft + torch AdamW (≥ 1.0×).
- 32 prompts × 64 new tokens (greedy, no stop), 32 concurrent `sample` calls: SDK vs in-process sampler (≥ 0.9×)
  and SDK vs `generate` batched with left padding (≥ 1.3×).

The server phase runs first with nothing else loaded in this process; then the server stops and the in-process
engine and the library baselines run on the engine's compute thread (one OpenMP team, as in `bench train`).
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from treadle.bench.api import _start_server
from treadle.bench.runner import Row, timed
from treadle.bench.sample import generate_fn, prompts
from treadle.bench.train import _peft_step_fn, sft_batch
from treadle.engine.engine import Engine
from treadle.engine.types import AdamParams, ForwardBackwardRequest, LoraConfig, SampleRequest, SamplingParams

RANK = 16


def _sdk_phase(model: str, data, ps: list[list[int]], new: int, repeat: int) -> tuple[float, float]:  # noqa: ANN001
    """(median seconds per SFT step, seconds for the concurrent samples) through the SDK."""
    import tinker
    from tinker import types

    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = _start_server(model, data_dir)
        try:
            service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            tc = service.create_lora_training_client(base_model=model, rank=RANK).result()
            sdk_data = [
                types.Datum(
                    model_input=types.ModelInput.from_ints(d.tokens.tolist()),
                    loss_fn_inputs={
                        "target_tokens": types.TensorData.from_numpy(
                            d.loss_fn_inputs["target_tokens"].numpy().astype(np.int64)
                        ),
                        "weights": types.TensorData.from_numpy(
                            d.loss_fn_inputs["weights"].numpy().astype(np.float32)
                        ),
                    },
                )
                for d in data
            ]

            def step() -> None:
                fb = tc.forward_backward(sdk_data, "cross_entropy")
                opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
                fb.result()
                opt.result()

            t_step = timed(step, repeat=repeat)
            sc = service.create_sampling_client(base_model=model).result()
            params = types.SamplingParams(max_tokens=new, temperature=0.0, stop=[])

            def one(p: list[int]) -> None:
                out = sc.sample(types.ModelInput.from_ints(p), 1, params).result()
                assert len(out.sequences[0].tokens) == new

            with ThreadPoolExecutor(len(ps)) as ex:
                list(ex.map(one, ps))  # warm-up
                t0 = time.perf_counter()
                list(ex.map(one, ps))
                t_sample = time.perf_counter() - t0
            return t_step, t_sample
        finally:
            proc.terminate()
            proc.wait(60)


def bench_sdk(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    batch, seq, n, new, repeat = (4, 64, 8, 16, 2) if quick else (8, 128, 32, 64, 3)
    engine = Engine(model)  # tokenizer and vocab only until the server phase is over (no compute)
    try:
        data = sft_batch(batch, seq, engine.info.vocab_size)
        ps = prompts(engine, n)
        t_sdk_step, t_sdk_sample = _sdk_phase(model, data, ps, new, repeat)

        engine.create_adapter("bench", LoraConfig(rank=RANK, seed=0, train_unembed=False))

        def local_step() -> None:
            res = engine.forward_backward([ForwardBackwardRequest("bench", data, "cross_entropy")])
            assert not isinstance(res[0], Exception), res[0]
            engine.optim_step("bench", AdamParams())

        t_local_step = timed(local_step, repeat=repeat)
        peft_step = engine.compute.call(_peft_step_fn, engine.info.tokenizer_dir, data, RANK)
        t_peft_step = timed(lambda: engine.compute.call(peft_step), repeat=repeat)

        params = SamplingParams(max_tokens=new, temperature=0.0, stop=())

        def local_sample() -> None:
            futs = [engine.sample(SampleRequest(None, p, params)) for p in ps]
            for f in futs:
                assert len(f.result().sequences[0].tokens) == new

        t_local_sample = timed(local_sample, repeat=1)
        generate = generate_fn(engine, ps, new)
        t_hf_sample = timed(
            lambda: engine.compute.call(generate), repeat=1
        )  # the warm-up call loads the model
    finally:
        engine.close()
    tok_step, tok_sample = batch * seq, n * new
    print(
        f"SFT {batch}x{seq} r{RANK} step: SDK {t_sdk_step * 1e3:.0f} ms, in-process {t_local_step * 1e3:.0f} ms, "
        f"peft {t_peft_step * 1e3:.0f} ms; sampling {n}x{new}: SDK {t_sdk_sample:.2f} s, "
        f"in-process {t_local_sample:.2f} s, generate {t_hf_sample:.2f} s"
    )
    rows = [
        Row(
            f"SFT {batch}x{seq} r{RANK}: SDK vs in-process",
            tok_step / t_sdk_step,
            tok_step / t_local_step,
            "tok/s",
            0.95,
        ),
        Row(
            f"SFT {batch}x{seq} r{RANK}: SDK vs transformers+peft",
            tok_step / t_sdk_step,
            tok_step / t_peft_step,
            "tok/s",
            1.0,
        ),
        Row(
            f"sample {n}x{new}: SDK vs in-process",
            tok_sample / t_sdk_sample,
            tok_sample / t_local_sample,
            "tok/s",
            0.9,
        ),
        Row(
            f"sample {n}x{new}: SDK vs generate",
            tok_sample / t_sdk_sample,
            tok_sample / t_hf_sample,
            "tok/s",
            1.3,
        ),
    ]
    extra: dict[str, object] = {
        "seconds": {
            "sdk_step": t_sdk_step,
            "local_step": t_local_step,
            "peft_step": t_peft_step,
            "sdk_sample": t_sdk_sample,
            "local_sample": t_local_sample,
            "generate": t_hf_sample,
        }
    }
    return rows, extra
