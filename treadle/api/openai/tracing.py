"""Serving a deployment through the OpenAI endpoints: which version serves the request, the response headers that
say so, and the token-exact trace of every choice, stored before the response completes.

The traces carry the prompt ids exactly as rendered and every token the sampler drew with its logprob (including
the end-of-turn/EOS token that ended the turn, which the OpenAI text never shows), straight from the sampler:
nothing is re-tokenized.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from starlette.responses import Response

from treadle.api.openai.generation import Choice, GenerationSpec
from treadle.service.traces import TraceRecord

if TYPE_CHECKING:
    from treadle.service.deployments import DeploymentTarget

VERSION_HEADER = "X-Treadle-Deployment-Version"
NAME_HEADER = "X-Treadle-Deployment"
T = TypeVar("T")


class DeploymentGateway(Protocol):
    """What the OpenAI routes need from the deployment service (`treadle.service.deployments.Deployments`)."""

    async def lookup(self, model: str, owner: str) -> DeploymentTarget | None:
        """The version serving `model` for `owner` (its adapter loaded), or None if it names no deployment."""
        ...

    def names(self, owner: str) -> list[str]: ...

    async def record(self, target: DeploymentTarget, records: list[TraceRecord]) -> None: ...


@dataclasses.dataclass
class Clock:
    """Request timings: received → submitted to the sampler → first sampled token → finished."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    submitted: float | None = None
    first_token: float | None = None

    def mark_submitted(self) -> None:
        self.submitted = time.perf_counter()

    def on_token(self, _index: int, _token: int, _logprob: float) -> None:
        # Runs on the compute thread for every token: keep it to one comparison.
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def timings(self) -> dict[str, float | None]:
        """queued_s: received → handed to the sampler (validation, template, version lookup); prefill_s: handed
        to the sampler → first token (waiting for a batch slot + prefill); total_s: received → finished."""
        now = time.perf_counter()
        sub = self.submitted if self.submitted is not None else self.start
        return {
            "queued_s": sub - self.start,
            "prefill_s": (self.first_token - sub) if self.first_token is not None else None,
            "total_s": now - self.start,
        }


def tag(response: Response, target: DeploymentTarget | None) -> Response:
    if target is not None:
        response.headers[NAME_HEADER] = target.served.deployment
        response.headers[VERSION_HEADER] = str(target.served.version)
    return response


def choice_id(completion_id: str, index: int) -> str:
    """Choice 0 is traced under the response's `id`; choice i > 0 under `<id>-<i>`."""
    return completion_id if index == 0 else f"{completion_id}-{index}"


def records(
    completion_id: str,
    endpoint: str,
    body: dict[str, Any],
    specs: Sequence[GenerationSpec],
    choices: dict[int, Choice],
    clock: Clock,
) -> list[TraceRecord]:
    """One trace per choice; choice i came from prompt `specs[i // n]` (each prompt has n samples)."""
    timings = clock.timings()
    n = specs[0].n
    user, session = body.get("user"), body.get("session_id")
    return [
        TraceRecord(
            completion_id=choice_id(completion_id, i),
            endpoint=endpoint,
            request=body,
            prompt_tokens=list(specs[i // n].prompt),
            completion_tokens=list(c.sampled_tokens),
            completion_logprobs=list(c.sampled_logprobs),
            completion_text=c.text,
            stop_reason=c.finish_reason,
            timings=timings,
            user=user if isinstance(user, str) else None,
            session_id=session if isinstance(session, str) else None,
        )
        for i, c in sorted(choices.items())
    ]


async def then(chunks: AsyncIterator[T], after: Callable[[], Awaitable[None]]) -> AsyncIterator[T]:
    """Pass `chunks` through, then run `after` before the stream's end (`[DONE]`) goes out."""
    async for c in chunks:
        yield c
    await after()
