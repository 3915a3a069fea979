"""Sampling math without a model: seeds, temperature / top-k / top-p filtering, the exponential race, stops."""

from __future__ import annotations

import torch

from treadle.engine.sampling import (
    StopCriteria,
    draw_exponential,
    filter_logits,
    gumbel_argmax,
    make_generator,
    sample_seed,
    sample_tokens,
    string_stop_hit,
)


def test_sample_seeds_are_deterministic_and_distinct() -> None:
    assert sample_seed(1, 0) == sample_seed(1, 0)
    seeds = {sample_seed(s, i) for s in range(10) for i in range(10)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**63 for s in seeds)


def test_row_noise_does_not_depend_on_batch() -> None:
    alone = draw_exponential([make_generator(5, 1)], 50, torch.device("cpu"))
    batch = draw_exponential(
        [make_generator(9, 0), make_generator(5, 1), make_generator(5, 2)], 50, torch.device("cpu")
    )
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[1], batch[2])


def test_top_k_keeps_exactly_k_and_top_p_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]]))
    one = torch.tensor([1.0, 1.0])
    k = filter_logits(logits, one, torch.tensor([2, -1]), one)
    assert torch.isfinite(k[0]).tolist() == [True, False, True, False]
    assert torch.isfinite(k[1]).all()
    # nucleus: the fewest most-likely tokens whose mass reaches top_p
    p = filter_logits(logits, one, torch.tensor([-1, -1]), torch.tensor([0.8, 0.65]))
    assert torch.isfinite(p[0]).tolist() == [True, False, True, False]  # 0.5 + 0.3 ≥ 0.8
    assert torch.isfinite(p[1]).tolist() == [False, False, True, True]  # 0.4 + 0.3 ≥ 0.65
    # the most likely token survives even a vanishing top_p
    tiny = filter_logits(logits, one, torch.tensor([-1, -1]), torch.tensor([1e-9, 1e-9]))
    assert torch.isfinite(tiny).sum(-1).tolist() == [1, 1]
    assert tiny.argmax(-1).tolist() == [0, 3]


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # within the top-2, probabilities are 4/7 and 3/7: top_p 0.5 keeps only the first
    out = filter_logits(logits, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, -3.0]])
    out = filter_logits(logits, torch.tensor([0.5]), torch.tensor([-1]), torch.tensor([1.0]))
    assert torch.allclose(out, logits / 0.5)


def test_exponential_race_draws_from_softmax() -> None:
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    g = make_generator(0, 0)
    n = 20000
    noise = torch.stack([torch.empty(4).exponential_(generator=g) for _ in range(n)])
    draws = gumbel_argmax(probs.log().expand(n, 4), noise)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_sample_tokens_greedy_rows_and_batch_independence() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    greedy = sample_tokens(logits, [0.0, 0.0, 0.0], [-1] * 3, [1.0] * 3, [None] * 3)
    assert torch.equal(greedy, logits.argmax(-1))
    mixed = sample_tokens(
        logits,
        [0.0, 1.0, 1.0],
        [-1, 5, -1],
        [1.0, 1.0, 0.9],
        [None, make_generator(3, 0), make_generator(3, 1)],
    )
    assert int(mixed[0]) == int(greedy[0])
    assert int(mixed[1]) in logits[1].topk(5).indices.tolist()
    alone = sample_tokens(logits[1:2], [1.0], [5], [1.0], [make_generator(3, 0)])
    assert int(alone[0]) == int(mixed[1])
    top1 = sample_tokens(logits, [2.0] * 3, [1] * 3, [1.0] * 3, [make_generator(1, i) for i in range(3)])
    assert torch.equal(top1, greedy)


def test_stop_criteria_resolution() -> None:
    assert StopCriteria.resolve(None, [2, 3]) == StopCriteria(frozenset({2, 3}), ())
    assert StopCriteria.resolve((), [2, 3]) == StopCriteria(frozenset(), ())
    assert StopCriteria.resolve([5, "END", 6], [2]) == StopCriteria(frozenset({5, 6}), ("END",))


def test_string_stop_hit_across_tokens() -> None:
    vocab = {1: "he", 2: "llo", 3: " wor", 4: "ld", 5: "!"}

    def decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids)

    assert not string_stop_hit([1, 2], ["world"], decode)
    assert not string_stop_hit([1, 2, 3], ["world"], decode)
    assert string_stop_hit([1, 2, 3, 4], ["world"], decode)
    assert string_stop_hit([5] * 100 + [3, 4], ["xyz", "orl"], decode)  # only the tail is decoded
    assert not string_stop_hit([1, 2, 3, 4], [], decode)
