"""Sampling tokens for the OpenAI routes: each request holds `n × (prompt + max_tokens)` per prompt in the
server's sampling-token budget (the one Tinker `asample` uses) from before generation starts until it ends
(result, error, or the client gone mid-stream). Over the budget the request waits server-side for room, up to
`--queue-wait-s`, then is answered 429 with `Retry-After` naming the limit, which the openai client retries.

The backend provides the budget as an optional `hold_sampling_tokens(owner, tokens)`; one without it (a test
double) admits everything."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from treadle.api.openai.generation import GenerationSpec, sampling_params

if TYPE_CHECKING:
    from treadle.api.openai.backend import OpenAIBackend, ServedModel


def request_tokens(engine: ServedModel, specs: Sequence[GenerationSpec]) -> int:
    """What a request holds while it generates; invalid lengths raise the same 400 generation would."""
    ctx = engine.info.max_context_length
    return sum(s.n * (len(s.prompt) + sampling_params(s, ctx).max_tokens) for s in specs)


async def hold_tokens(
    backend: OpenAIBackend, owner: str, engine: ServedModel, specs: Sequence[GenerationSpec]
) -> Callable[[], None]:
    """Wait for room and hold the request's tokens; returns their (idempotent) release."""
    tokens = request_tokens(engine, specs)
    hold: Callable[[str, int], Awaitable[Callable[[], None]]] | None = getattr(
        backend, "hold_sampling_tokens", None
    )
    if hold is None:
        return lambda: None
    return await hold(owner, tokens)
