"""Sampling math without a model: seeds, temperature / top-k / top-p filtering, inverse-CDF draws, stops."""

from __future__ import annotations

import torch

from treadle.engine.sampling import (
    StopCriteria,
    draw_uniform,
    filter_logits,
    inverse_cdf,
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


def test_row_draws_do_not_depend_on_batch() -> None:
    cpu = torch.device("cpu")
    alone = draw_uniform([make_generator(5, 1)], cpu)
    batch = draw_uniform([make_generator(9, 0), make_generator(5, 1), make_generator(5, 2)], cpu)
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


def test_inverse_cdf_draws_from_softmax_and_never_a_masked_token() -> None:
    probs = torch.tensor([0.6, 0.0, 0.25, 0.1, 0.05, 0.0])
    logits = probs.log()  # zero probability: -inf, as filter_logits masks
    n = 20000
    g = make_generator(0, 0)
    u = torch.cat([draw_uniform([g], torch.device("cpu")) for _ in range(n)])
    draws = inverse_cdf(logits.expand(n, 6), u)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq
    assert freq[1] == 0 and freq[5] == 0
    # the extremes of U[0, 1): the first token with mass, and never past the last one with mass
    edges = inverse_cdf(logits.expand(2, 6), torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64))
    assert edges.tolist() == [0, 4]


def test_inverse_cdf_keeps_the_tail_of_a_large_vocabulary() -> None:
    """A float32 running sum over 49k entries would drift by more than a tail token's mass; float64 does not."""
    V = 49152
    logits = torch.zeros(V)
    logits[0] = 12.0  # one dominant token (about 80 % of the mass), a long flat tail
    probs = torch.softmax(logits.double(), -1)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # stratified: the draws' CDF is exact to 1e-3
    draws = inverse_cdf(logits.expand(1000, V), u)
    assert abs(float((draws == 0).double().mean()) - float(probs[0])) < 2e-3
    assert bool((draws < V).all())


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
