"""Pure sampling math: per-sample generators, temperature / top-k / top-p filtering, inverse-CDF draws, stops.

Everything here works on token ids and logits only (no model, no tokenizer), so it tests without a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import torch


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`: a hash, so nearby seeds/indices decorrelate."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The private generator of one sample: its random numbers never depend on batch-mates (Invariant 2)."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, index))
    return g


def draw_uniform(generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """(B,) float64 U[0, 1) draws, row b from generator b. Every row draws exactly one number per call, so a
    sample's stream is the same whether it runs alone or in any batch."""
    return torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=device) for g in generators])


def filter_logits(
    logits_B_V: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor
) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside each row's top-k, then top-p, set to -inf.

    `temperature_B` must be > 0; `top_k_B` uses -1 for off; `top_p_B` uses 1.0 for off. Top-p is applied to
    the distribution renormalised over the top-k set (the vLLM order). The most likely token is always kept.
    """
    scaled_B_V = logits_B_V.float() / temperature_B[:, None]
    need_k, need_p = bool((top_k_B > 0).any()), bool((top_p_B < 1).any())
    if not (need_k or need_p):
        return scaled_B_V
    V = scaled_B_V.shape[-1]
    sorted_B_V, order_B_V = scaled_B_V.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=scaled_B_V.device)
    k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))
    keep_B_V = rank_V[None, :] < k_B[:, None]
    if need_p:
        probs_B_V = torch.softmax(sorted_B_V.masked_fill(~keep_B_V, float("-inf")), dim=-1)
        before_B_V = probs_B_V.cumsum(dim=-1) - probs_B_V  # mass strictly above this token
        keep_B_V &= before_B_V < top_p_B[:, None]
    keep_B_V[:, 0] = True
    mask_B_V = torch.zeros_like(keep_B_V).scatter_(1, order_B_V, keep_B_V)
    return scaled_B_V.masked_fill(~mask_B_V, float("-inf"))


def inverse_cdf(filtered_B_V: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """(B,) draws from softmax(filtered) by inversion: the first token whose cumulative probability exceeds
    u · total. One random number per row (the exponential race needed one per vocabulary entry, most of a small
    model's decode step). The cumulative sum is in float64, so even the vocabulary's tail keeps its mass; a
    masked (-inf) token has probability 0 and is never drawn."""
    probs_B_V = torch.softmax(filtered_B_V.double(), dim=-1)
    cdf_B_V = probs_B_V.cumsum(dim=-1)
    x_B = uniform_B.to(cdf_B_V.device) * cdf_B_V[:, -1]
    idx_B = torch.searchsorted(cdf_B_V, x_B[:, None], right=True).squeeze(-1)
    V = probs_B_V.shape[-1]
    over_B = idx_B >= V
    if bool(over_B.any()):  # u · total rounded up to total: take the last token that has any probability
        last_B = V - 1 - (probs_B_V.flip(-1) > 0).int().argmax(dim=-1)
        idx_B = torch.where(over_B, last_B, idx_B)
    return idx_B


def sample_tokens(
    logits_B_V: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """(B,) next tokens: greedy argmax where temperature is 0, else a draw from row b's own generator."""
    out_B = logits_B_V.argmax(dim=-1)
    hot = [i for i, t in enumerate(temperature) if t > 0]
    if not hot:
        return out_B
    dev = logits_B_V.device
    idx = torch.tensor(hot, device=dev)
    filtered = filter_logits(
        logits_B_V[idx],
        torch.tensor([temperature[i] for i in hot], device=dev, dtype=torch.float32),
        torch.tensor([top_k[i] for i in hot], device=dev),
        torch.tensor([top_p[i] for i in hot], device=dev, dtype=torch.float32),
    )
    gens: list[torch.Generator] = []
    for i in hot:
        g = generators[i]
        assert g is not None, "a sampled (temperature > 0) row needs its generator"
        gens.append(g)
    out_B[idx] = inverse_cdf(filtered, draw_uniform(gens, dev))
    return out_B


@dataclasses.dataclass(frozen=True)
class StopCriteria:
    """When a sequence ends: on any of `token_ids`, or once its decoded text contains any of `strings`."""

    token_ids: frozenset[int]
    strings: tuple[str, ...]

    @classmethod
    def resolve(cls, stop: Sequence[int | str] | None, eos_token_ids: Sequence[int]) -> StopCriteria:
        """Tinker's rule: None → the EOS ids; [] → no stop at all; else the listed ids and strings."""
        if stop is None:
            return cls(frozenset(eos_token_ids), ())
        return cls(
            frozenset(s for s in stop if isinstance(s, int)), tuple(s for s in stop if isinstance(s, str))
        )


def string_stop_hit(
    generated: Sequence[int], strings: Sequence[str], decode: Callable[[list[int]], str]
) -> bool:
    """True when the tail of `generated` decodes to text containing a stop string.

    Checked after every token, so a hit is always new. Only a tail is decoded (O(1) per token): a string of
    n characters spans at most 4n tokens even with byte-fallback tokens (≤ 4 UTF-8 bytes per character).
    """
    if not strings:
        return False
    window = 4 * max(len(s) for s in strings) + 4
    text = decode(list(generated[-window:]))
    return any(s in text for s in strings)
