"""The SDK 0.38 scoring options of a sample request beyond prompt logprobs, computed from the same prefill
log-softmax the sampler already takes for prompt logprobs (so they cost no extra model pass):

- `target_prompt_logprobs`: the logprobs of chosen ids at chosen prompt positions ([P - 1, K], -1 = none);
- `prompt_alt_tokens_k`: k independent draws, at the request's temperature, from the next-token distribution at
  every prompt position after the first, with their (untempered) model logprobs;
- `prompt_logprobs_last_n`: only the last N prompt logprobs (and top-k) are returned; earlier ones are None;
- `topk_sample_logprobs`: the k most likely tokens at every sampled position.

Row i of every [P - 1, ·] tensor belongs to prompt position i + 1, whose distribution is the model's output at
position i (`tinker.types.SampleRequest`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from treadle.engine.sampling import make_generator
from treadle.engine.types import SampleRequest
from treadle.errors import require

# make_generator's sample index for the alt-token draws: apart from every sample's own stream
_ALT_STREAM = 1 << 30
MAX_K = 1024  # topk_sample_logprobs, prompt_alt_tokens_k and target columns per position


def wanted(req: SampleRequest) -> bool:
    """Whether the prefill must score the prompt for these options."""
    return req.target_prompt_logprobs is not None or req.prompt_alt_tokens_k > 0


def validate(req: SampleRequest, vocab_size: int) -> None:
    """Raise a UserError naming the field for an unusable option (Invariant 6)."""
    n = len(req.prompt)
    for field, k in (
        ("topk_sample_logprobs", req.topk_sample_logprobs),
        ("prompt_alt_tokens_k", req.prompt_alt_tokens_k),
    ):
        require(
            type(k) is int and 0 <= k <= min(MAX_K, vocab_size),
            field,
            f"must be an integer in 0..{min(MAX_K, vocab_size)}, got {k!r}",
        )
    if req.prompt_alt_tokens_k:
        require(
            n >= 2, "prompt_alt_tokens_k", "needs a prompt of at least 2 tokens (position 0 has no context)"
        )
    last_n = req.prompt_logprobs_last_n
    if last_n is not None:
        require(
            req.prompt_logprobs or req.topk_prompt_logprobs > 0,
            "prompt_logprobs_last_n",
            "requires prompt_logprobs (or topk_prompt_logprobs)",
        )
        require(
            type(last_n) is int and 1 <= last_n <= n - 1,
            "prompt_logprobs_last_n",
            f"must be an integer in 1..{n - 1} (len(prompt) - 1), got {last_n!r}",
        )
    t = req.target_prompt_logprobs
    if t is not None:
        field = "target_prompt_logprobs"
        require(
            not t.is_floating_point() and t.dtype != torch.bool, field, "must be an int64 tensor of token ids"
        )
        require(
            t.dim() == 2 and int(t.shape[0]) == n - 1 and 1 <= int(t.shape[1]) <= MAX_K,
            field,
            f"must have shape [len(prompt) - 1, K] = [{n - 1}, K] with 1 ≤ K ≤ {MAX_K}, got {list(t.shape)}",
        )
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            require(
                lo >= -1 and hi < vocab_size,
                field,
                f"ids must be -1 (no request) or in 0..{vocab_size - 1}, got {lo if lo < -1 else hi}",
            )


@dataclasses.dataclass
class PromptExtras:
    """Accumulates the options' rows over a chunked prefill (rows arrive in prompt order)."""

    target_rows: list[torch.Tensor] = dataclasses.field(default_factory=list)
    alt_ids: list[torch.Tensor] = dataclasses.field(default_factory=list)
    alt_logprobs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    generator: torch.Generator | None = None

    def add(self, req: SampleRequest, seed: int, lp_T_V: torch.Tensor, first_row: int) -> None:
        """Rows first_row .. first_row + T of the options, from the log-softmax of those positions' logits."""
        T = lp_T_V.shape[0]
        if req.target_prompt_logprobs is not None:
            ids_T_K = req.target_prompt_logprobs[first_row : first_row + T].to(lp_T_V.device)
            got = lp_T_V.gather(1, ids_T_K.clamp(min=0))
            self.target_rows.append(torch.where(ids_T_K >= 0, got, torch.zeros_like(got)).float().cpu())
        k = req.prompt_alt_tokens_k
        if k > 0:
            temperature = req.params.temperature
            if temperature == 0:
                ids = lp_T_V.argmax(-1, keepdim=True).expand(T, k)
            else:
                if self.generator is None:
                    self.generator = make_generator(seed, _ALT_STREAM, lp_T_V.device)
                probs = torch.softmax(lp_T_V.float() / temperature, dim=-1)
                ids = torch.multinomial(probs, k, replacement=True, generator=self.generator)
            self.alt_ids.append(ids.cpu())
            self.alt_logprobs.append(lp_T_V.gather(1, ids).float().cpu())

    def target(self) -> torch.Tensor | None:
        return torch.cat(self.target_rows) if self.target_rows else None

    def alt_tokens(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.alt_ids:
            return None
        return torch.cat(self.alt_ids).long(), torch.cat(self.alt_logprobs)


def keep_last_n(
    req: SampleRequest,
    logprobs: list[float] | None,
    topk: list[list[tuple[int, float]]] | None,
) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """`prompt_logprobs_last_n`: entries before the last N prompt positions become NaN (None to the SDK) / empty."""
    n = req.prompt_logprobs_last_n
    if n is None:
        return logprobs, topk
    cut = len(req.prompt) - n
    if logprobs is not None:
        logprobs = [math.nan] * cut + logprobs[cut:]
    if topk is not None:
        topk = [[] for _ in range(cut)] + topk[cut:]
    return logprobs, topk


def topk_rows(lp_B_V: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]] | None]:
    """`topk_sample_logprobs`: row b's k_b most likely (token, logprob) pairs, None where k_b is 0."""
    kmax = max(ks)
    if kmax == 0:
        return [None] * len(ks)
    vals, idx = lp_B_V.topk(kmax, dim=-1)
    vals_l, idx_l = vals.tolist(), idx.tolist()
    return [list(zip(idx_l[b][:k], vals_l[b][:k], strict=True)) if k else None for b, k in enumerate(ks)]
