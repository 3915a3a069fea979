"""Continuous-batching sampler: on the engine's compute thread (`treadle.engine.compute`), each step runs one
batched decode over every active sequence, admitting new requests between steps and retiring finished ones, over a
slot-based KV cache.

Each sample is one row. A row's prompt KV comes from another live row when they share a prefix (same adapter):
the samples of one request prefill their prompt once, and concurrent requests share common prefixes. Logprobs
are those of the raw model distribution (what `forward` computes), whatever temperature / top-k / top-p did.

Retained prefixes (multi-turn): a finished row's slot keeps its KV (prompt + generated tokens) as a prefix
source, so the next turn of a conversation (previous prompt + reply + new user/env text) prefills only what is
new. A retained slot is keyed on the identity and version of the weights that wrote it (`weights_key`), never on
the adapter name alone, so KV written under other weights (a new snapshot, a trained or re-created adapter) is
never reused. Retention never grows the cache: retained slots are evicted, least recently used first, whenever a
new row needs a slot, and the KV budget is enforced exactly as without them.

Streaming: `submit(req, on_token=...)` reports every accepted token from the compute thread as it is drawn, and a
cancelled future (`Sampler.cancel` or `future.cancel()`) has its rows dropped before the next model call.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import math
import secrets
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from treadle import ops
from treadle.engine import prompt_extras, validate
from treadle.engine.compute import ComputeThread
from treadle.engine.kv_cache import SlotKVCache
from treadle.engine.prompt_extras import PromptExtras
from treadle.engine.sampling import StopCriteria, make_generator, sample_tokens, string_stop_hit
from treadle.engine.types import SampledSequence, SampleRequest, SampleResult
from treadle.errors import TreadleError, require
from treadle.models import CausalLM, LoraHook
from treadle.models.qwen3_vl import ImageSpan

# (sample index, token id, logprob), called on the compute thread for every accepted token, stop token included.
TokenCallback = Callable[[int, int, float], None]
# adapter id (None = base model) -> (an object whose identity stands for the weights behind it, their version),
# or None when they cannot be keyed (then finished rows of that adapter are not retained).
WeightsKey = Callable[[str | None], "tuple[object, int] | None"]

# Prompt logprobs are computed over chunks of positions so a long prompt never holds (T × vocab) fp32 at once.
_PROMPT_LOGPROB_CHUNK = 256
# A row waits for a batch-mate's prefill (one more model call) only when that shares this many more tokens.
_MIN_SHARED_PREFILL = 16
# Padded tokens per prefill call: bounds activation memory; longer prompts are prefilled in chunks.
_PREFILL_TOKENS = 2048
# An idle sampler keeps at most this many (slot × position) KV entries allocated.
_IDLE_CACHE_TOKENS = 32 * 512


@dataclasses.dataclass
class SamplerStats:
    """Counters for tests and metrics: how much work the model did."""

    prefill_tokens: int = 0  # prompt tokens run through the model (cache hits excluded)
    prefill_calls: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens of every admitted row
    cache_hit_tokens: int = 0  # of those, tokens whose KV came from another slot (live or retained)
    retained_hit_tokens: int = 0  # of those, tokens whose KV came from a retained (finished) slot
    prefill_seconds: float = 0.0  # wall time in prefill model calls (a profile of where sampling time goes)
    decode_seconds: float = 0.0  # wall time in decode steps (model call, sampling, stop checks)


@dataclasses.dataclass(eq=False)
class _Request:
    req: SampleRequest
    future: concurrent.futures.Future[SampleResult]
    stop: StopCriteria
    seed: int
    sequences: list[SampledSequence | None]
    next_sample: int = 0
    rows_left: int = 0
    done: bool = False
    # logits at the last prompt position: later samples of this request reuse them with the shared prompt KV
    last_logits_V: torch.Tensor | None = None
    prompt_logprobs: list[float] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_cache_hit_tokens: int = 0
    prompt_scored: bool = False  # prompt_logprobs / topk_prompt_logprobs computed (by the first prefill)
    on_token: TokenCallback | None = None
    prompt_extras: PromptExtras | None = None  # target_prompt_logprobs / prompt_alt_tokens (prompt_extras.py)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.req.prompt_logprobs or self.req.topk_prompt_logprobs > 0 or prompt_extras.wanted(self.req)


@dataclasses.dataclass(eq=False)
class _Slot:
    """What a cache slot holds: the tokens whose KV it stores, under which adapter, written for which request.
    It serves as a prefix source while that request is in flight, and after it finished only when retained:
    then `weights` names the weights that wrote it, and it matches only while those are still the adapter's."""

    tokens: list[int]
    adapter_id: str | None
    owner: _Request
    ready: bool = True  # False while its prompt KV waits for this round's batched prefill
    weights: tuple[weakref.ref[object], int] | None = None  # set when retained (its row finished)
    last_used: int = 0  # retention clock at retention or last hit: the least recent is evicted first


@dataclasses.dataclass(eq=False)
class _Row:
    request: _Request
    index: int
    slot: int
    generator: torch.Generator | None
    next_token: int = -1  # sampled, not yet in the KV cache
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    topk: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # topk_sample_logprobs


@dataclasses.dataclass
class _PromptScores:
    """Prompt logprobs accumulated over a chunked prefill; position 0 has no distribution to score it."""

    logprobs: list[float] = dataclasses.field(default_factory=lambda: [math.nan])
    topk: list[list[tuple[int, float]]] = dataclasses.field(default_factory=lambda: [[]])
    extras: PromptExtras = dataclasses.field(default_factory=PromptExtras)


@dataclasses.dataclass(eq=False)
class _Prefill:
    row: _Row
    start: int  # the first prompt position whose KV is not in the row's slot yet


def _images(spans_B: list[list[ImageSpan]]) -> dict[str, Any]:
    """The model's `images` argument when a row has images (only vision models take it)."""
    return {"images": spans_B} if any(spans_B) else {}


def _same_images_until(a: SampleRequest, b: SampleRequest) -> int:
    """Prefix cache keyed on image content: two prompts' KV agree only up to their first differing image
    (placeholder tokens are equal for every image, so the token comparison alone cannot tell)."""
    for x, y in itertools.zip_longest(a.spans, b.spans):
        if x is None or y is None or x.key != y.key or x.start != y.start:
            return min(s.start for s in (x, y) if s is not None)
    return sys.maxsize


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix, by bisection over slice comparisons (C speed; prompts run to thousands)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Sampler:
    """Continuous-batching generation over one `CausalLM`; thread-safe `submit`. Its steps run on `compute`
    (shared with the engine's training ops), or on a compute thread of its own when none is given."""

    def __init__(
        self,
        model: CausalLM,
        lora_hook: Callable[[Sequence[str | None]], LoraHook | None],
        *,
        eos_token_ids: Sequence[int],
        max_context_length: int,
        decode: Callable[[list[int]], str] | None = None,
        max_batch_size: int = 64,
        max_kv_cache_bytes: int | None = None,
        compute: ComputeThread | None = None,
        weights_key: WeightsKey | None = None,
    ) -> None:
        """`max_kv_cache_bytes`: admission stops growing the KV cache past this (None: no limit). The cache
        is one block of slots × the longest row, so a single long prompt among many short ones would otherwise
        size every slot for it; under steady load the cache is never idle long enough to shrink back.

        `weights_key`: retain finished rows' KV as prefix sources (see the module docstring), keyed on what it
        returns for the row's adapter; None: no retention (prefixes are shared between live rows only)."""
        require(max_batch_size >= 1, "max_batch_size", f"must be ≥ 1, got {max_batch_size}")
        require(max_context_length >= 2, "max_context_length", f"must be ≥ 2, got {max_context_length}")
        self.model = model
        self._lora_hook = lora_hook
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_context_length = max_context_length
        self.max_batch_size = max_batch_size
        self.max_kv_cache_bytes = max_kv_cache_bytes
        self._decode = decode
        self._weights_key = weights_key
        self._clock = 0  # retention clock (see _Slot.last_used)
        self._owns_compute = compute is None
        self._compute = compute if compute is not None else ComputeThread("treadle-sampler")
        self.vocab_size = model.config.vocab_size
        param = model.model.embed_tokens.weight
        self.device = param.device
        cfg = model.config
        self._cache = self._compute.call(
            SlotKVCache,
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            max_slots=max_batch_size,
            max_len=max_context_length,
            dtype=param.dtype,
            device=self.device,
        )
        self.stats = SamplerStats()
        self._slots: dict[int, _Slot] = {}
        self._rows: list[_Row] = []
        self._waiting: collections.deque[_Request] = collections.deque()
        self._queue: collections.deque[_Request] = collections.deque()  # guarded by _compute.cond
        self._closed = False
        self._compute.attach(self)

    # public API -----------------------------------------------------------------------------------
    def submit(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]:
        """Validate (UserError naming the field) and queue; the future resolves when every sample is done.

        `on_token(sample_index, token_id, logprob)` runs on the compute thread for each accepted token (the final
        stop token included), before the future resolves; keep it cheap. If it raises, only this request fails.
        Cancelling the returned future stops its generation at the next step."""
        # A cheap guard for direct callers: the service ran the same checks at its edge (`treadle.engine.validate`).
        validate.sample_request(
            req,
            vocab_size=self.vocab_size,
            max_context_length=self.max_context_length,
            can_decode=self._decode is not None,
        )
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        r = _Request(
            req=req,
            future=concurrent.futures.Future(),
            stop=StopCriteria.resolve(req.params.stop, self.eos_token_ids),
            seed=seed,
            sequences=[None] * req.num_samples,
            rows_left=req.num_samples,
            on_token=on_token,
        )
        with self._compute.cond:
            if self._closed:
                raise TreadleError("sampler: closed; no new requests are accepted")
            self._queue.append(r)
            self._compute.cond.notify()
        return r.future

    def generate(self, req: SampleRequest) -> SampleResult:
        return self.submit(req).result()

    def cancel(self, future: concurrent.futures.Future[SampleResult]) -> bool:
        """Cancel a request returned by `submit`: its rows leave the batch before the next model call.
        False when it already finished (its result stands)."""
        cancelled = future.cancel()
        self._compute.wake()
        return cancelled

    @property
    def active_rows(self) -> int:
        """Rows (samples) decoding right now; a snapshot, for metrics and tests."""
        return len(self._rows)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop sampling; requests not yet finished fail with a TreadleError."""
        with self._compute.cond:
            if self._closed:
                return
            self._closed = True
        self._compute.call(self._fail_pending, TreadleError("sampler: closed before the request finished"))
        self._compute.detach(self)
        if self._owns_compute:
            self._compute.close()

    # steps on the compute thread ----------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self._closed and bool(self._queue or self._waiting or self._rows)

    def step(self) -> None:
        """Admit what arrived, then one decode step over every active row."""
        with self._compute.cond:
            self._waiting.extend(self._queue)
            self._queue.clear()
        self._drop_cancelled()
        try:
            with torch.inference_mode():
                self._admit_waiting()
                if self._rows:
                    t0 = time.perf_counter()
                    self._decode_step()
                    self.stats.decode_seconds += time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a bug must fail the running futures, not hang them
            for r in {row.request for row in self._rows} | set(self._waiting):
                self._fail(r, e)
        if not self._rows and not self._waiting:
            self._release_memory()

    def _fail_pending(self, err: TreadleError) -> None:
        with self._compute.cond:
            pending = list(self._queue) + list(self._waiting) + [row.request for row in self._rows]
            self._queue.clear()
        for r in pending:
            self._fail(r, err)

    def release_idle_memory(self) -> None:
        """On the compute thread, before a training op: if nothing samples, a cache that grew large goes back to
        the allocator, retained prefixes with it (training needs the memory, and an RL loop's next rollout
        samples new weights that could not reuse them anyway)."""
        with self._compute.cond:
            if self._queue:
                return
        if not self._rows and not self._waiting:
            self._release_memory(keep_retained=False)

    def _release_memory(self, keep_retained: bool = True) -> None:
        """Once nothing runs, forget slots that cannot serve again (not retained, or their weights are gone) and
        give a cache that grew large (one long prompt grows every slot) back to the allocator, unless retained
        prefixes still live in it and it stays within the KV budget (the next turn of a conversation is
        typically seconds away)."""
        for slot in [s for s, info in self._slots.items() if not self._retained(info)]:
            del self._slots[slot]
        if self._cache.num_slots * self._cache.capacity > _IDLE_CACHE_TOKENS:
            budget = self.max_kv_cache_bytes
            if not keep_retained or not self._slots or budget is None or self._cache.nbytes > budget:
                self._slots.clear()
                self._cache.reset()

    @staticmethod
    def _retained(info: _Slot) -> bool:
        """Whether a slot of a finished request may still serve: retained, and its weights still exist."""
        return info.weights is not None and info.weights[0]() is not None

    def _current_weights(self, adapter_id: str | None) -> tuple[object, int] | None:
        if self._weights_key is None:
            return None
        try:
            return self._weights_key(adapter_id)
        except TreadleError:  # the adapter is gone: the request fails at its first model call
            return None

    def _retain(self, row: _Row) -> None:
        """Keep a finished row's slot (its KV: prompt + generated tokens but the last) as a prefix source."""
        info = self._slots.get(row.slot)
        if info is None or info.owner is not row.request or not info.ready:
            return
        key = self._current_weights(row.request.req.adapter_id)
        if key is None:
            return
        self._clock += 1
        info.weights = (weakref.ref(key[0]), key[1])
        info.last_used = self._clock

    def _drop_cancelled(self) -> None:
        """Requests whose future was cancelled by their caller leave the batch and the queue."""
        for r in {row.request for row in self._rows} | set(self._waiting):
            if r.future.cancelled():
                self._fail(r, concurrent.futures.CancelledError())

    def _fail(self, r: _Request, err: BaseException) -> None:
        """Resolve `r` with `err` and drop its rows and queued samples (its batch-mates go on)."""
        if r.done:
            return
        r.done = True
        self._rows = [row for row in self._rows if row.request is not r]
        with contextlib.suppress(ValueError):
            self._waiting.remove(r)
        # The caller may cancel the future at any moment from its own thread.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            r.future.set_exception(err)

    def _hook(self, adapter_ids: Sequence[str | None]) -> LoraHook | None:
        return self._lora_hook(adapter_ids)

    # admission: place new rows, prefill their prompts in one batched call, draw their first tokens -----------
    def _admit_waiting(self) -> None:
        pending: list[_Prefill] = []
        new_rows: list[_Row] = []
        while self._waiting and len(self._rows) < self.max_batch_size:
            r = self._waiting[0]
            if r.done:
                self._waiting.popleft()
                continue
            # the first row is admitted whatever its size, or it would wait forever
            if self._rows and not self._kv_room_for(r):
                break
            src, p, src_pending = self._best_prefix(r)
            # A sibling's prompt (its logits) or a much longer shared prefix is still being prefilled in this
            # round: run the round's prefill first, then place this row against the written KV.
            if src_pending or any(pf.row.request is r for pf in pending):
                self._flush(pending)
                pending = []
                continue
            index = r.next_sample
            r.next_sample += 1
            if r.next_sample >= r.req.num_samples:
                self._waiting.popleft()
            row, pf = self._place(r, index, src, p)
            new_rows.append(row)
            if pf is not None:
                pending.append(pf)
        self._flush(pending)
        live = [row for row in new_rows if not row.request.done]
        if live:
            firsts = [row.request.last_logits_V for row in live]
            logits_B_V = torch.stack([x for x in firsts if x is not None])
            assert logits_B_V.shape[0] == len(live), "every placed row's prompt was prefilled"
            self._sample_and_accept(live, logits_B_V)

    def _kv_room_for(self, r: _Request) -> bool:
        """Whether one more row of `r` fits the KV budget at its full length (prompt + max_tokens) beside the
        rows running now; growth the cache already holds costs nothing more. Rows that do not fit wait in
        order (their requests stay queued) until running rows finish."""
        if self.max_kv_cache_bytes is None:
            return True
        longest = max(
            [len(row.request.req.prompt) + row.request.req.params.max_tokens for row in self._rows]
            + [len(r.req.prompt) + r.req.params.max_tokens]
        )
        need = self._cache.nbytes_after(len(self._rows) + 1, longest)
        return need <= max(self.max_kv_cache_bytes, self._cache.nbytes)

    def _best_prefix(self, r: _Request) -> tuple[int | None, int, bool]:
        """The slot sharing the longest prompt prefix with `r` (same adapter, owner in flight), the usable length,
        and whether that slot's KV is only pending (to be written by this round's prefill)."""
        prompt = r.req.prompt
        n = len(prompt)
        # Prompt logprobs need logits at every prompt position, so their first prefill runs the whole prompt.
        if r.wants_prompt_logprobs and not r.prompt_scored:
            return None, 0, any(info.owner is r and not info.ready for info in self._slots.values())
        # The last prompt position's logits must come from somewhere: a sibling's, or a fresh prefill.
        limit = n if r.last_logits_V is not None else n - 1
        best: tuple[int | None, int] = (None, 0)
        best_pending = 0
        weights: tuple[object, int] | None | bool = False  # looked up once, on the first retained candidate
        for slot, info in self._slots.items():
            if info.adapter_id != r.req.adapter_id:
                continue
            if info.owner.done:
                if info.weights is None:
                    continue
                if weights is False:
                    weights = self._current_weights(r.req.adapter_id)
                # the very weights that wrote this KV (same object, same version), or it is stale
                if not isinstance(weights, tuple) or info.weights[0]() is not weights[0]:
                    continue
                if info.weights[1] != weights[1]:
                    continue
            p = min(_common_prefix(info.tokens, prompt), limit, _same_images_until(info.owner.req, r.req))
            if not info.ready:
                best_pending = max(best_pending, p)
            elif p > best[1]:
                best = (slot, p)
        return best[0], best[1], best_pending >= best[1] + _MIN_SHARED_PREFILL

    def _free_slot(self, prefer: int | None) -> int:
        """`prefer` if no row holds it; else, in order: an allocated slot holding nothing that can serve, the
        least recently used retained slot, an unallocated slot (the cache grows), a prefix source of an
        in-flight request. So retention never grows the cache, and live prefix sources are kept longest."""
        used = {row.slot for row in self._rows}
        if prefer is not None and prefer not in used:
            return prefer
        allocated = self._cache.num_slots

        def rank(s: int) -> tuple[int, int]:
            info = self._slots.get(s)
            if info is not None and not info.owner.done:
                return (3, s)
            if s >= allocated:
                return (2, s)
            if info is not None and self._retained(info):
                return (1, info.last_used)
            return (0, s)

        return min((s for s in range(self.max_batch_size) if s not in used), key=rank)

    def _place(self, r: _Request, index: int, src: int | None, p: int) -> tuple[_Row, _Prefill | None]:
        """Give sample `index` of `r` a slot holding the first `p` prompt tokens' KV (copied from `src`); the
        rest of the prompt, if any, is returned as a prefill to run."""
        prompt = r.req.prompt
        n = len(prompt)
        prefer = None
        if src is not None and p > 0:
            source = self._slots[src]
            prefer = src
            if source.owner.done:
                self._clock += 1
                source.last_used = self._clock  # evicted last
                self.stats.retained_hit_tokens += p
                # Taking the source slot over saves a copy, but a retained source matched only in part keeps
                # its longer prefix for its own conversation's next turn while another slot is free.
                if p < len(source.tokens):
                    prefer = None
        slot = self._free_slot(prefer)
        self._cache.ensure(slot + 1, n)
        if src is not None and p > 0:
            self._cache.copy_prefix(src, slot, p)
        if index == 0:
            r.prompt_cache_hit_tokens = p
        self.stats.prompt_tokens += n
        self.stats.cache_hit_tokens += p
        gen = make_generator(r.seed, index, self.device) if r.req.params.temperature > 0 else None
        row = _Row(r, index, slot, gen)
        self._rows.append(row)
        self._slots[slot] = _Slot(list(prompt), r.req.adapter_id, r, ready=p == n)
        return row, (_Prefill(row, p) if p < n else None)

    def _flush(self, pending: list[_Prefill]) -> None:
        """Run the round's prefills as one batch; if that fails, one by one, so only the culprit fails."""
        if not pending:
            return
        t0 = time.perf_counter()
        try:
            self._prefill_or_fail(pending)
        finally:
            self.stats.prefill_seconds += time.perf_counter() - t0

    def _prefill_or_fail(self, pending: list[_Prefill]) -> None:
        try:
            self._prefill(pending)
            return
        except Exception as e:  # noqa: BLE001 - every failure resolves a future (Invariant 4)
            if len(pending) == 1:
                self._fail(pending[0].row.request, e)
                return
        for pf in pending:
            try:
                self._prefill([pf])
            except Exception as e:  # noqa: BLE001
                self._fail(pf.row.request, e)

    def _prefill(self, pending: list[_Prefill]) -> None:
        """prompt[start:] of every pending row into its slot, in right-padded batches of at most
        `_PREFILL_TOKENS` tokens (long prompts go in chunks, so no call's activations grow with the prompt);
        sets each request's last prompt logits and, where asked, its prompt logprobs."""
        pending = [pf for pf in pending if not pf.row.request.done]
        if not pending:
            return
        prompts = [pf.row.request.req.prompt for pf in pending]
        scored = {
            b: _PromptScores()
            for b, pf in enumerate(pending)
            if pf.start == 0 and pf.row.request.wants_prompt_logprobs and not pf.row.request.prompt_scored
        }
        last_V: dict[int, torch.Tensor] = {}
        pos = [pf.start for pf in pending]
        while active := [b for b in range(len(pending)) if pos[b] < len(prompts[b])]:
            width = max(1, _PREFILL_TOKENS // len(active))
            chunks = [prompts[b][pos[b] : pos[b] + width] for b in active]
            lengths = [len(c) for c in chunks]
            T = max(lengths)
            tokens_B_T = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=self.device)
            step = self._cache.step([pending[b].row.slot for b in active], [pos[b] for b in active], lengths)
            hook = self._hook([pending[b].row.request.req.adapter_id for b in active])
            hidden_B_T_D = self.model(
                tokens_B_T,
                step.positions_B_T,
                mask_B_T_S=step.mask_B_T_S,
                lora=hook,
                cache=step,
                **_images([pending[b].row.request.req.spans for b in active]),
            )
            last_B = torch.tensor([n - 1 for n in lengths], device=self.device)
            rows_B = torch.arange(len(active), device=self.device)
            logits_B_V = self.model.logits(hidden_B_T_D[rows_B, last_B][:, None], hook)[:, 0]
            for j, b in enumerate(active):
                if b in scored:
                    r = pending[b].row.request
                    row_hook = self._hook([r.req.adapter_id])
                    self._score_prompt(r, hidden_B_T_D[j : j + 1, : lengths[j]], pos[b], row_hook, scored[b])
            for j, b in enumerate(active):
                pos[b] += lengths[j]
                if pos[b] == len(prompts[b]):
                    last_V[b] = logits_B_V[j]
            self.stats.prefill_tokens += sum(lengths)
            self.stats.prefill_calls += 1
        for b, pf in enumerate(pending):
            r = pf.row.request
            r.last_logits_V = last_V[b]
            self._slots[pf.row.slot].ready = True
            if b in scored:
                r.prompt_scored = True
                r.prompt_logprobs = scored[b].logprobs if r.req.prompt_logprobs else None
                r.topk_prompt_logprobs = scored[b].topk if r.req.topk_prompt_logprobs > 0 else None
                r.prompt_extras = scored[b].extras

    def _score_prompt(
        self, r: _Request, hidden_1_T_D: torch.Tensor, first: int, hook: LoraHook | None, acc: _PromptScores
    ) -> None:
        """Prompt logprobs of the positions after `first` .. `first + T` (position t's distribution scores
        prompt[t + 1]), appended to `acc`."""
        prompt = r.req.prompt
        k = r.req.topk_prompt_logprobs
        m = min(hidden_1_T_D.shape[1], len(prompt) - 1 - first)  # positions whose next token is in the prompt
        for a in range(0, m, _PROMPT_LOGPROB_CHUNK):
            b = min(a + _PROMPT_LOGPROB_CHUNK, m)
            lp_T_V = ops.current().log_softmax(self.model.logits(hidden_1_T_D[:, a:b], hook)[0], dim=-1)
            targets_T = torch.tensor(prompt[first + a + 1 : first + b + 1], device=self.device)
            acc.logprobs.extend(lp_T_V.gather(1, targets_T[:, None])[:, 0].tolist())
            if k > 0:
                vals, idx = lp_T_V.topk(k, dim=-1)
                for vs, ids in zip(vals.tolist(), idx.tolist(), strict=True):
                    acc.topk.append(list(zip(ids, vs, strict=True)))
            acc.extras.add(r.req, r.seed, lp_T_V, first + a)

    # decode: one batched model call for every active row ---------------------------------------------------
    def _decode_step(self) -> None:
        rows = sorted(self._rows, key=lambda row: row.slot)
        slots = [row.slot for row in rows]
        starts = [len(self._slots[s].tokens) for s in slots]
        tokens_B_1 = torch.tensor([[row.next_token] for row in rows], device=self.device)
        try:
            step = self._cache.step(slots, starts, [1] * len(slots))
            hook = self._batch_hook(rows)
            if len(hook[1]) != len(rows):  # some rows' adapters are gone; they were failed
                return
            hidden = self.model(
                tokens_B_1,
                step.positions_B_T,
                mask_B_T_S=step.mask_B_T_S,
                lora=hook[0],
                cache=step,
                **_images([row.request.req.spans for row in rows]),
            )
            logits_B_V = self.model.logits(hidden, hook[0])[:, -1]
        except Exception as e:  # noqa: BLE001 - a failed step fails its rows' requests, never hangs them
            for row in rows:
                self._fail(row.request, e)
            return
        for row in rows:
            self._slots[row.slot].tokens.append(row.next_token)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(rows)
        self._sample_and_accept(rows, logits_B_V)

    def _batch_hook(self, rows: list[_Row]) -> tuple[LoraHook | None, list[_Row]]:
        """The batch's LoRA hook. If it cannot be built (an adapter was removed mid-generation), only the
        requests whose adapter fails are failed; returns the surviving rows so the caller can retry."""
        ids = [row.request.req.adapter_id for row in rows]
        try:
            return self._hook(ids), rows
        except Exception:  # noqa: BLE001 - find the culprit adapters below
            pass
        bad: set[str | None] = set()
        for aid in set(ids):
            try:
                self._hook([aid])
            except Exception as e:  # noqa: BLE001
                bad.add(aid)
                for row in rows:
                    if row.request.req.adapter_id == aid:
                        self._fail(row.request, e)
        return None, [row for row in rows if row.request.req.adapter_id not in bad]

    def _sample_and_accept(self, rows: list[_Row], logits_B_V: torch.Tensor) -> None:
        params = [row.request.req.params for row in rows]
        tokens_B = sample_tokens(
            logits_B_V,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [row.generator for row in rows],
        )
        # Tinker semantics: the logprob of the sampled token under the unmodified model distribution.
        lp_B_V = ops.current().log_softmax(logits_B_V, dim=-1)
        lp_B = lp_B_V.gather(1, tokens_B[:, None])[:, 0]
        topk_B = prompt_extras.topk_rows(lp_B_V, [row.request.req.topk_sample_logprobs for row in rows])
        for row, tok, lp, topk in zip(rows, tokens_B.tolist(), lp_B.tolist(), topk_B, strict=True):
            self._accept(row, tok, lp, topk)

    def _accept(
        self, row: _Row, token: int, logprob: float, topk: list[tuple[int, float]] | None = None
    ) -> None:
        r = row.request
        if r.done:  # failed earlier in this step (a batch-mate's callback raised)
            return
        row.generated.append(token)
        row.logprobs.append(logprob)
        if topk is not None:
            row.topk.append(topk)
        if r.on_token is not None:
            try:
                r.on_token(row.index, token, logprob)
            except Exception as e:  # noqa: BLE001 - a caller's callback fails its own request, never the loop
                self._fail(r, e)
                return
        reason: Literal["stop", "length"] | None = None
        if token in r.stop.token_ids:
            reason = "stop"
        elif (
            r.stop.strings
            and self._decode is not None
            and string_stop_hit(row.generated, r.stop.strings, self._decode)
        ):
            reason = "stop"
        elif len(row.generated) >= r.req.params.max_tokens:
            reason = "length"
        if reason is None:
            row.next_token = token
            return
        self._rows.remove(row)
        self._retain(row)
        r.sequences[row.index] = SampledSequence(
            row.generated, row.logprobs, reason, row.topk if r.req.topk_sample_logprobs else None
        )
        r.rows_left -= 1
        if r.rows_left == 0 and not r.done:
            r.done = True
            seqs = [s for s in r.sequences if s is not None]
            prompt_lp, topk_prompt = prompt_extras.keep_last_n(
                r.req, r.prompt_logprobs, r.topk_prompt_logprobs
            )
            result = SampleResult(
                sequences=seqs,
                prompt_logprobs=prompt_lp,
                topk_prompt_logprobs=topk_prompt,
                prompt_cache_hit_tokens=r.prompt_cache_hit_tokens,
                target_prompt_logprobs=r.prompt_extras.target() if r.prompt_extras else None,
                prompt_alt_tokens=r.prompt_extras.alt_tokens() if r.prompt_extras else None,
            )
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                r.future.set_result(result)
