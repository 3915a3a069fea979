"""Live `stream: true`: tokens flow from the sampler thread into the event loop as they are drawn and leave as
text deltas, so the first chunk goes out while the rest of the reply is still being generated.

Text is decoded incrementally in short windows, so a multi-byte character split over tokens goes out whole; the
end-of-turn token never shows; text that could be the start of a stop string is held back until it is known not
to be one. When a sample finishes, its exact non-streaming text (`finish_sequence`) settles the tail, so the
concatenated deltas equal the non-streaming text. Closing the stream early cancels generation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from treadle.api.openai.generation import Choice, GenerationSpec, finish_sequence, sampling_params
from treadle.engine.types import SampleRequest, SampleResult
from treadle.errors import TreadleError

if TYPE_CHECKING:
    from treadle.api.openai.backend import ServedModel

log = logging.getLogger(__name__)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (it may yet become one)."""
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class IncrementalText:
    """One sample's reply as its tokens arrive: the same offsets `token_end_offsets` computes for the finished
    sequence, and how much of the text is safe to release now."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stop_strings if s]
        self._stop_ids = set(stop_token_ids)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.ends: list[int] = []  # end of each token's text in `text`
        self.text = ""
        self._prefix, self._read = 0, 0  # ids[prefix:read] is context that makes the next window decode right
        self._searched = 0  # text[:searched] holds no complete stop string
        self.cut: int | None = None  # where the first stop string starts, once seen
        self.released = 0  # characters already sent
        self.attached = 0  # tokens whose logprobs were already sent

    def push(self, token: int, logprob: float) -> None:
        # The sampler stops at the first stop token, so it is always the last one: OpenAI never shows it.
        if self.cut is not None or token in self._stop_ids:
            return
        self.ids.append(token)
        self.logprobs.append(logprob)
        before = _decode(self._tokenizer, self.ids[self._prefix : self._read])
        after = _decode(self._tokenizer, self.ids[self._prefix :])
        # A token ending inside a multi-byte character decodes to U+FFFD: wait for the one completing it.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        self.ends.append(len(self.text))
        if self._stops:
            start = max(0, self._searched - self._max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
            if hits:
                self.cut = min(hits)
            self._searched = len(self.text)

    def releasable(self) -> int:
        if self.cut is not None:
            return self.cut
        return len(self.text) - held_back(self.text, self._stops)

    def take(self) -> tuple[str, int, int] | None:
        """(new text, first token, end token) safe to send now; the tokens are those whose text starts before
        the released end (the rule `finish_sequence` keeps tokens by), or None when nothing new is safe."""
        end = self.releasable()
        if end <= self.released:
            return None
        piece = self.text[self.released : end]
        first = self.attached
        stop = first
        while stop < len(self.ids) and (self.ends[stop - 1] if stop else 0) < end:
            stop += 1
        self.released, self.attached = end, stop
        return piece, first, stop

    def as_choice(self) -> Choice:
        """The partial reply as a `Choice`, for the logprob encoders."""
        return Choice(self.text, self.ids, self.ends, self.logprobs, None, "length", len(self.ids))


@dataclasses.dataclass
class Delta:
    """One piece of one choice: `text` with the logprobs of `choice.token_ids[start:stop]`, or its finish."""

    index: int
    text: str
    choice: Choice
    start: int
    stop: int
    finish: str | None = None


@dataclasses.dataclass
class _Pending:
    spec: GenerationSpec
    future: concurrent.futures.Future[SampleResult]
    first_index: int  # the response's choice index of this request's sample 0


class LiveGeneration:
    """The requests behind one streamed response, submitted at construction (so bad input is rejected before
    the stream starts) and reporting tokens into this event loop."""

    def __init__(self, engine: ServedModel, adapter_id: str | None, specs: Sequence[GenerationSpec]) -> None:
        self._tokenizer = engine.tokenizer
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, int, int, float] | int] = asyncio.Queue()
        self._pending: list[_Pending] = []
        self.prompt_tokens = sum(len(s.prompt) for s in specs)
        self.completion_tokens = 0
        self.finals: dict[int, Choice] = {}  # choice index → its finished reply (deployment traces read it)
        self.first_token_at: float | None = None  # time.perf_counter() of the first token
        first = 0
        try:
            for k, spec in enumerate(specs):
                params = sampling_params(spec, engine.info.max_context_length)
                req = SampleRequest(
                    adapter_id, list(spec.prompt), params, num_samples=spec.n, spans=list(spec.spans)
                )
                fut = engine.sample(req, self._token_sink(loop, k))
                fut.add_done_callback(self._done_sink(loop, k))
                self._pending.append(_Pending(spec, fut, first))
                first += spec.n
        except BaseException:
            self.cancel()
            raise
        self.num_choices = first

    def _token_sink(self, loop: asyncio.AbstractEventLoop, k: int) -> Callable[[int, int, float], None]:
        def on_token(i: int, token: int, logprob: float) -> None:
            # Raises once the loop is closed, which fails the request: nobody is listening any more.
            loop.call_soon_threadsafe(self._queue.put_nowait, (k, i, token, logprob))

        return on_token

    def _done_sink(
        self, loop: asyncio.AbstractEventLoop, k: int
    ) -> Callable[[concurrent.futures.Future[SampleResult]], None]:
        def on_done(fut: concurrent.futures.Future[SampleResult]) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, k)
            except RuntimeError:  # the loop is gone with its client; nothing to tell
                pass

        return on_done

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every request of this response has stopped generating (finished, failed or
        cancelled), from whichever thread ends the last one."""
        left = [len(self._pending)]
        lock = threading.Lock()

        def one_done(_f: object) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                callback()

        if not self._pending:
            callback()
        for p in self._pending:
            p.future.add_done_callback(one_done)

    def cancel(self) -> None:
        """Stop whatever is still generating (the client went away, or the stream ended early)."""
        for p in self._pending:
            p.future.cancel()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas in arrival order, each choice closed by a `finish` delta; raises the request's error if
        generation fails midway."""
        texts: dict[tuple[int, int], IncrementalText] = {}
        open_requests = len(self._pending)
        while open_requests:
            item = await self._queue.get()
            if isinstance(item, int):
                open_requests -= 1
                async for d in self._finish(item, texts):
                    yield d
                continue
            k, i, token, logprob = item
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            p = self._pending[k]
            inc = texts.get((k, i))
            if inc is None:
                inc = texts[k, i] = IncrementalText(
                    self._tokenizer, p.spec.stop_strings, p.spec.stop_token_ids
                )
            inc.push(token, logprob)
            got = inc.take()
            if got is not None:
                piece, a, b = got
                yield Delta(p.first_index + i, piece, inc.as_choice(), a, b)

    async def _finish(self, k: int, texts: dict[tuple[int, int], IncrementalText]) -> AsyncIterator[Delta]:
        p = self._pending[k]
        if p.future.cancelled():
            raise TreadleError("generation was cancelled before it finished")
        exc = p.future.exception()
        if exc is not None:
            raise exc
        result = p.future.result()
        tok = self._tokenizer
        # Detokenizing whole replies is CPU work: keep it off the event loop.
        finals = await asyncio.to_thread(lambda: [finish_sequence(tok, s, p.spec) for s in result.sequences])
        for i, c in enumerate(finals):
            self.completion_tokens += c.num_generated
            self.finals[p.first_index + i] = c
            inc = texts.get((k, i))
            sent, attached = (inc.text[: inc.released], inc.attached) if inc is not None else ("", 0)
            # Incremental decoding agrees with whole-sequence decoding for the tokenizers we serve; the finished
            # text is authoritative for whatever was not sent yet.
            if not c.text.startswith(sent):
                log.warning("openai stream: incremental text diverged from the final text; tail dropped")
            tail = c.text[len(sent) :] if c.text.startswith(sent) else ""
            if tail or attached < len(c.token_ids):
                yield Delta(p.first_index + i, tail, c, min(attached, len(c.token_ids)), len(c.token_ids))
            yield Delta(p.first_index + i, "", c, 0, 0, finish=c.finish_reason)
