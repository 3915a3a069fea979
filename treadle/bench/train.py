"""LoRA training throughput vs transformers + peft on the same batch, and 8 adapters fused vs 8 separate steps."""

from __future__ import annotations

import torch

from treadle.bench.runner import Row, timed
from treadle.engine.engine import Engine
from treadle.engine.types import AdamParams, Datum, ForwardBackwardRequest, LoraConfig


def sft_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        toks = torch.randint(0, vocab, (seq + 1,), generator=g)
        out.append(Datum(toks[:-1], {"target_tokens": toks[1:], "weights": torch.ones(seq)}))
    return out


def _peft_step_fn(model_dir: str, data: list[Datum], rank: int):
    import peft
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    pm = peft.get_peft_model(hf, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    tokens = torch.stack([d.tokens for d in data])
    targets = torch.stack([d.loss_fn_inputs["target_tokens"] for d in data])

    def step() -> None:
        logits = pm(input_ids=tokens).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def bench_train(model: str, *, quick: bool = False) -> list[Row]:
    batch, seq, repeat = (4, 64, 2) if quick else (8, 128, 3)
    rank = 32
    engine = Engine(model)
    try:
        vocab = engine.info.vocab_size
        data = sft_batch(batch, seq, vocab)
        # train_unembed off so both sides adapt exactly the same projections
        engine.create_adapter("bench", LoraConfig(rank=rank, seed=0, train_unembed=False))

        def treadle_step() -> None:
            res = engine.forward_backward([ForwardBackwardRequest("bench", data, "cross_entropy")])
            assert not isinstance(res[0], Exception), res[0]
            engine.optim_step("bench", AdamParams())

        t_treadle = timed(treadle_step, repeat=repeat)
        # the baseline runs on the engine's compute thread too, so both sides compute with the same (one)
        # OpenMP team: see treadle.engine.compute
        peft_step = engine.compute.call(_peft_step_fn, engine.info.tokenizer_dir, data, rank)
        t_peft = timed(lambda: engine.compute.call(peft_step), repeat=repeat)
        tokens = batch * seq
        rows = [
            Row(f"LoRA SFT step, {batch}x{seq} tokens", tokens / t_treadle, tokens / t_peft, "tok/s", 1.0)
        ]

        # 8 adapters, small batch each: one fused forward_backward vs 8 separate calls
        n_adapters, small_seq = 8, 32  # small batches: where per-call overhead dominates
        small = sft_batch(1, small_seq, vocab, seed=1)
        for i in range(n_adapters):
            engine.create_adapter(f"a{i}", LoraConfig(rank=rank, seed=i))

        def fused() -> None:
            engine.forward_backward(
                [ForwardBackwardRequest(f"a{i}", small, "cross_entropy") for i in range(n_adapters)]
            )
            for i in range(n_adapters):
                engine.optim_step(f"a{i}", AdamParams())

        def separate() -> None:
            for i in range(n_adapters):
                engine.forward_backward([ForwardBackwardRequest(f"a{i}", small, "cross_entropy")])
                engine.optim_step(f"a{i}", AdamParams())

        t_fused, t_sep = timed(fused, repeat=repeat), timed(separate, repeat=repeat)
        rows.append(
            Row(
                f"{n_adapters} adapters x 1x{small_seq}: fused vs separate",
                1 / t_fused,
                1 / t_sep,
                "steps/s",
                3.0,
            )
        )
        return rows
    finally:
        engine.close()
