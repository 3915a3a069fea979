"""Turning sampled sequences into OpenAI choices on the real SmolLM2 tokenizer: the end-of-turn token is
stripped, stop strings cut the text and its tokens together, and stream pieces always rejoin to the text
(also when one character spans several tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from treadle.api.openai.generation import GenerationSpec, finish_sequence, sampling_params
from treadle.api.openai.streaming import token_pieces
from treadle.engine.types import SampledSequence
from treadle.errors import UserError

IM_END = 2  # <|im_end|> in the SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _spec(
    stop_strings: list[str] | None = None, prompt_len: int = 3, max_tokens: int | None = None
) -> GenerationSpec:
    return GenerationSpec(
        prompt=list(range(1, prompt_len + 1)),
        prompt_field="messages",
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        n=1,
        stop_strings=stop_strings or [],
        stop_token_ids=[IM_END],
        top_logprobs=0,
    )


def _seq(ids: list[int], reason: str = "length") -> SampledSequence:
    return SampledSequence(ids, [-float(i + 1) for i in range(len(ids))], reason)  # type: ignore[arg-type]


def test_end_of_turn_is_stripped_but_counted(tok):
    ids = tok.encode("Paris is nice.")
    c = finish_sequence(tok, _seq([*ids, IM_END], "stop"), _spec())
    assert (c.text, c.token_ids, c.finish_reason) == ("Paris is nice.", ids, "stop")
    assert len(c.logprobs) == len(ids) and c.num_generated == len(ids) + 1


def test_stop_string_cuts_text_tokens_and_logprobs_together(tok):
    ids = tok.encode("one two three four")
    c = finish_sequence(tok, _seq(ids), _spec(stop_strings=["hree", " fo"]))
    assert c.text == "one two t" and c.finish_reason == "stop"
    # Tokens that contribute text before the cut stay, the rest go (with their logprobs).
    assert tok.decode(c.token_ids).startswith(c.text) and len(c.token_ids) == len(c.logprobs) < len(ids)
    assert c.end_offsets[-1] == len(c.text)
    assert "".join(p for _, p in token_pieces(c)) == c.text


def test_multibyte_characters_stream_whole(tok):
    ids = tok.encode("Café 🦙 ok")
    c = finish_sequence(tok, _seq(ids), _spec())
    pieces = [p for _, p in token_pieces(c)]
    assert len(pieces) == len(ids) and "".join(pieces) == "Café 🦙 ok"
    assert "\ufffd" not in "".join(pieces) and " 🦙" in pieces  # the emoji arrives with its last byte
    assert c.finish_reason == "length"


def test_context_limits_name_the_field():
    with pytest.raises(UserError) as e:
        sampling_params(_spec(prompt_len=8), max_context=8)
    assert e.value.field == "messages"
    with pytest.raises(UserError) as e:
        sampling_params(_spec(prompt_len=3, max_tokens=6), max_context=8)
    assert e.value.field == "max_tokens" and "at most 5" in e.value.message
    params = sampling_params(_spec(prompt_len=3), max_context=8)
    assert params.max_tokens == 5 and params.stop == (IM_END,)  # default: the rest of the context
