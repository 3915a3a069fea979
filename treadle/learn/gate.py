"""The promotion gate: a fixed evaluation set every candidate must not regress on.

The set is JSONL of `{"messages": [...], "completion": str}`; its score is the mean log-prob per token of the
reference completions (+ end-of-turn) under the weights being judged, read from the training client's
`forward` (no extra sampler, no sampling noise). A candidate passes if it scores at least the live version's
score minus the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinker import types

from treadle.learn.batch import sft_datum


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, …).

    Read off the template by rendering a probe reply (the server's renderer does the same; the learner is
    client-side and cannot import it). Falls back to the tokenizer's EOS token.
    """
    probe = "treadle-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:
        text = ""
    if isinstance(text, str) and probe in text:
        after = tokenizer.encode(text.split(probe, 1)[1], add_special_tokens=False)
        if after and after[0] in set(getattr(tokenizer, "all_special_ids", [])):
            return [int(after[0])]
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if eos is not None else []


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def load_gate_set(path: Path, tokenizer: Any, eot_ids: list[int]) -> list[types.Datum]:
    datums: list[types.Datum] = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages, completion = row["messages"], row["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"gate_set line {i + 1}: expected {{'messages': [...], 'completion': str}} ({e})"
            ) from None
        ids = tokenizer.encode(str(completion), add_special_tokens=False)
        datums.append(sft_datum(render_prompt(tokenizer, messages), ids, eot_ids))
    if not datums:
        raise ValueError(f"gate_set {path}: no examples")
    return datums


def mean_token_logprob(datums: list[types.Datum], outputs: list[dict[str, Any]]) -> float:
    """Σ weight·logprob / Σ weight over all datums (`outputs`: the per-datum `loss_fn_outputs`)."""
    total = 0.0
    count = 0.0
    for datum, out in zip(datums, outputs, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        lps = out["logprobs"].tolist()
        total += sum(float(w) * float(lp) for w, lp in zip(weights, lps, strict=True))
        count += sum(float(w) for w in weights)
    return total / count if count else 0.0


def gate_score(training_client: Any, datums: list[types.Datum]) -> float:
    result = training_client.forward(datums, "cross_entropy").result()
    return mean_token_logprob(datums, result.loss_fn_outputs)


def gate_passes(candidate: float, live: float, tolerance: float) -> bool:
    return candidate >= live - tolerance
