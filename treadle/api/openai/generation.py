"""One OpenAI generation request → the engine's shared sampler → finished choices with text, logprobs and offsets.

Both endpoints come through here, so `/v1/completions`, `/v1/chat/completions` and Tinker sampling all share one
continuous-batching sampler and one copy of the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from treadle.engine.types import SampledSequence, SampleRequest, SampleResult, SamplingParams
from treadle.errors import UserError
from treadle.models.qwen3_vl import ImageSpan

if TYPE_CHECKING:
    from treadle.api.openai.backend import ServedModel
    from treadle.engine.sampler import TokenCallback


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    prompt: list[int]
    prompt_field: str  # the request field the prompt came from, for error messages ("messages", "prompt")
    max_tokens: int | None  # None → up to the end of the context window
    temperature: float
    top_p: float
    seed: int | None
    n: int
    stop_strings: list[str]
    stop_token_ids: list[int]  # end-of-turn/EOS: generation ends there and the token is not returned
    top_logprobs: int  # 0 = none
    spans: list[ImageSpan] = dataclasses.field(default_factory=list)  # images in `prompt` (vision models)


@dataclasses.dataclass
class Choice:
    text: str
    token_ids: list[int]  # the tokens behind `text` (stop token and stop string removed)
    end_offsets: list[int]  # end of each token's text in `text`; the last one is len(text)
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: Literal["stop", "length"]
    num_generated: int  # tokens the sampler produced, for `usage`
    # Every token the sampler drew and its logprob, stop token included (deployment traces record these).
    sampled_tokens: list[int] = dataclasses.field(default_factory=list)
    sampled_logprobs: list[float] = dataclasses.field(default_factory=list)


def sampling_params(spec: GenerationSpec, max_context: int) -> SamplingParams:
    room = max_context - len(spec.prompt)
    if room < 1:
        raise UserError(
            f"{spec.prompt_field}: the prompt is {len(spec.prompt)} tokens; this model's context is {max_context}",
            field=spec.prompt_field,
        )
    if spec.max_tokens is not None and spec.max_tokens > room:
        raise UserError(
            f"max_tokens: {spec.max_tokens} + the prompt's {len(spec.prompt)} tokens exceed this model's "
            f"context of {max_context}; use at most {room}",
            field="max_tokens",
        )
    stop: tuple[int | str, ...] = (*spec.stop_token_ids, *spec.stop_strings)
    return SamplingParams(
        max_tokens=spec.max_tokens if spec.max_tokens is not None else room,
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=spec.seed,
        stop=stop,
    )


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_end_offsets(tokenizer: Any, ids: list[int], text: str) -> list[int]:
    """Where each token's text ends in `text`, decoding a short window per token (linear, not quadratic).

    A token that ends inside a multi-byte character decodes to U+FFFD on its own; its text is attributed to
    the token that completes the character (the incremental detokenization of HF TGI / vLLM)."""
    ends: list[int] = []
    length = 0
    prefix, read = 0, 0  # ids[prefix:read] is already-emitted context that makes the next decode correct
    for i in range(len(ids)):
        before = _decode(tokenizer, ids[prefix:read])
        after = _decode(tokenizer, ids[prefix : i + 1])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            length += len(after) - len(before)
            prefix, read = read, i + 1
        ends.append(min(length, len(text)))
    if ends:
        ends[-1] = len(text)
    return ends


def finish_sequence(tokenizer: Any, seq: SampledSequence, spec: GenerationSpec) -> Choice:
    """Strip the stop token, cut at the first stop string (OpenAI never returns it), keep tokens in step."""
    ids, lps = list(seq.tokens), list(seq.logprobs)
    finish: Literal["stop", "length"] = seq.stop_reason
    if ids and ids[-1] in spec.stop_token_ids:
        ids, lps, finish = ids[:-1], lps[:-1], "stop"
    text = _decode(tokenizer, ids)
    ends = token_end_offsets(tokenizer, ids, text)
    cuts = [i for i in (text.find(s) for s in spec.stop_strings) if i >= 0]
    if cuts:
        cut = min(cuts)
        text, finish = text[:cut], "stop"
        # Keep the tokens that contribute at least one character before the cut.
        keep = sum(1 for j in range(len(ids)) if (ends[j - 1] if j else 0) < cut)
        ids, lps = ids[:keep], lps[:keep]
        ends = [min(e, cut) for e in ends[:keep]]
        if ends:
            ends[-1] = len(text)
    return Choice(text, ids, ends, lps, None, finish, len(seq.tokens), list(seq.tokens), list(seq.logprobs))


async def _top_logprobs(
    engine: ServedModel, adapter_id: str | None, spec: GenerationSpec, choice: Choice
) -> list[list[tuple[int, float]]]:
    """Top-k alternatives at each generated position: re-score prompt + reply once through the same sampler
    (its top-k prompt logprobs at those positions are exactly the distributions the tokens were drawn from)."""
    if not choice.token_ids:
        return []
    prompt, k = spec.prompt, spec.top_logprobs
    req = SampleRequest(
        adapter_id,
        prompt + choice.token_ids,
        SamplingParams(max_tokens=1, temperature=0.0),
        topk_prompt_logprobs=k,
        spans=list(spec.spans),
    )
    res = await asyncio.wrap_future(engine.sample(req))
    topk = res.topk_prompt_logprobs
    if topk is None:
        raise UserError(
            "top_logprobs: this model's sampler does not return top-k logprobs", field="top_logprobs"
        )
    return [list(topk[len(prompt) + j]) for j in range(len(choice.token_ids))]


async def generate(
    engine: ServedModel, adapter_id: str | None, spec: GenerationSpec, on_token: TokenCallback | None = None
) -> list[Choice]:
    params = sampling_params(spec, engine.info.max_context_length)
    req = SampleRequest(adapter_id, list(spec.prompt), params, num_samples=spec.n, spans=list(spec.spans))
    result: SampleResult = await asyncio.wrap_future(engine.sample(req, on_token))
    # Detokenizing is CPU work: keep it off the event loop that also serves the Tinker API.
    choices = await asyncio.to_thread(
        lambda: [finish_sequence(engine.tokenizer, seq, spec) for seq in result.sequences]
    )
    if spec.top_logprobs > 0:
        tops = await asyncio.gather(*(_top_logprobs(engine, adapter_id, spec, c) for c in choices))
        for c, t in zip(choices, tops, strict=True):
            c.top_logprobs = t
    return choices


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
