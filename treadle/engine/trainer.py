"""forward / forward_backward on mixed-adapter batches: one model pass per micro-batch, each row through its
own adapter, each datum's loss computed separately and summed (Tinker protocol §5.4: sum-reduced), gradients
accumulating in each adapter's tensors until its optim_step."""

from __future__ import annotations

import dataclasses

import torch

from treadle.engine import losses, validate
from treadle.engine.types import Datum, ForwardBackwardRequest, ForwardBackwardResult
from treadle.errors import NotFoundError, TreadleError
from treadle.lora import AdapterBank
from treadle.models import CausalLM

# Rows are packed into micro-batches of at most this many padded tokens so that what one model pass keeps for
# backward stays small: logits (T × vocab, fp32) and, per layer, the activations and the attention
# probabilities (rows × heads × T × T on CPU's math attention). At 4096 tokens of ~800-token RL trajectories the
# default 135M model's server peaked at 13-14 GB RSS (OOM-killed beside a second server on 24 GB); at 1024 the
# GEMMs are as efficient and the peak is about a quarter.
DEFAULT_MICROBATCH_TOKENS = 1024


@dataclasses.dataclass
class _Row:
    request: int  # index of the request in the call
    index: int  # index of the datum in its request
    datum: Datum
    adapter_id: str | None
    forward_only: bool


def validate_request(req: ForwardBackwardRequest, bank: AdapterBank, vocab_size: int, max_len: int) -> None:
    """The checks that can fail before the model runs (Invariant 6: bad input costs nothing else). The data are
    checked by `validate.forward_backward_data`, which the service already ran at its edge before the future
    existed (there it is a 400); here it only guards direct callers of the `Engine` API, with the same limits.
    Whether the adapter is loaded is known only now, when the request runs."""
    if req.adapter_id is not None and req.adapter_id not in bank:
        raise NotFoundError(f"model_id: no adapter {req.adapter_id!r} is loaded", field="model_id")
    validate.forward_backward_data(req, vocab_size, max_len)


def _microbatches(rows: list[_Row], budget: int) -> list[list[_Row]]:
    """Group rows (longest first) so that rows × max_len ≤ budget; a row longer than the budget goes alone."""
    order = sorted(rows, key=lambda r: -int(r.datum.tokens.numel()))
    out: list[list[_Row]] = []
    cur: list[_Row] = []
    for r in order:
        n = int(r.datum.tokens.numel())
        width = max([n] + [int(c.datum.tokens.numel()) for c in cur])
        if cur and width * (len(cur) + 1) > budget:
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def _targets_B_T_K(row_inputs: list[dict[str, torch.Tensor]], T: int, device: torch.device) -> torch.Tensor:
    """Every row's target ids, zero-padded to (B, T, K); K > 1 only for (N, K) top-K distillation targets."""
    targets = [inp["target_tokens"].long() for inp in row_inputs]
    K = max(1 if t.dim() == 1 else int(t.shape[1]) for t in targets)
    out = torch.zeros(len(targets), T, K, dtype=torch.long, device=device)
    for b, t in enumerate(targets):
        t2 = t[:, None] if t.dim() == 1 else t
        out[b, : t2.shape[0], : t2.shape[1]] = t2
    return out


def _target_logprobs(
    model: CausalLM,
    bank: AdapterBank,
    mb: list[_Row],
    requests: list[ForwardBackwardRequest],
    row_inputs: list[dict[str, torch.Tensor]],
    hidden_B_T_D: torch.Tensor,
    targets_B_T_K: torch.Tensor,
    train_ids: set[str],
) -> torch.Tensor:
    """(B, T, K) target log-probs of every real position, with an autograd graph only where the loss can have a
    gradient (`losses.gradient_support`).

    The unembedding (hidden → vocabulary logits, then a log-softmax over the vocabulary) is the largest matmul
    of a small model and, with a 49k vocabulary, the largest tensors of a pass. Most positions of an RL datum
    (the prompt, the tool and environment replies: advantage 0) and of a masked SFT datum (weight 0) cannot
    receive a gradient, and forward-only rows never do; they are unembedded without autograd, so backward costs
    the unembedding only at the positions that train, and padding is not unembedded at all. Each position is
    unembedded once either way; positions become rows of a (P, 1, D) batch, still grouped by adapter, so the
    batch-invariant mode computes every value bitwise as the whole-row pass would. Both lm_head calls happen
    even when one is empty, so every rank of a sharded engine runs the same passes.
    """
    device = hidden_B_T_D.device
    B, T, K = targets_B_T_K.shape
    real_B_T = torch.zeros(B, T, dtype=torch.bool, device=device)
    grad_B_T = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, r in enumerate(mb):
        n = int(r.datum.tokens.numel())
        real_B_T[b, :n] = True
        if r.forward_only or r.adapter_id not in train_ids:
            continue
        req = requests[r.request]
        support = None if req.custom_loss is not None else losses.gradient_support(req.loss_fn, row_inputs[b])
        grad_B_T[b, :n] = True if support is None else support.to(device)
    lp_B_T_K = torch.zeros(B, T, K, dtype=torch.float32, device=device)
    for with_grad in (False, True):
        b_P, t_P = (real_B_T & (grad_B_T == with_grad)).nonzero(as_tuple=True)
        ids = [mb[b].adapter_id for b in b_P.tolist()]
        with torch.set_grad_enabled(with_grad):
            hook = bank.hook(ids, train_ids=train_ids if with_grad else ())
            hidden_P_1_D = hidden_B_T_D[b_P, t_P].unsqueeze(1)
            lp_P_K = model.logprobs(hidden_P_1_D, hook)[:, 0].gather(-1, targets_B_T_K[b_P, t_P])
        lp_B_T_K = lp_B_T_K.index_put((b_P, t_P), lp_P_K)
    return lp_B_T_K


def _run_microbatch(
    model: CausalLM, bank: AdapterBank, mb: list[_Row], requests: list[ForwardBackwardRequest]
) -> list[tuple[_Row, torch.Tensor, losses.LossOutput]]:
    """One model pass over rows of possibly different adapters; backward of the training rows' summed loss."""
    device = next(model.parameters()).device
    # rows of one adapter side by side: the LoRA hook then works on contiguous slices (no gather/scatter)
    first_seen = {a: i for i, a in reversed(list(enumerate(r.adapter_id for r in mb)))}
    mb = sorted(mb, key=lambda r: first_seen[r.adapter_id])
    T = max(int(r.datum.tokens.numel()) for r in mb)
    tokens_B_T = torch.zeros(len(mb), T, dtype=torch.long, device=device)
    for b, r in enumerate(mb):
        tokens_B_T[b, : r.datum.tokens.numel()] = r.datum.tokens.to(device)
    # forward-only rows must not leave (zero) gradients that a later optim_step would act on
    train_ids = {r.adapter_id for r in mb if r.adapter_id is not None and not r.forward_only}
    hook = bank.hook([r.adapter_id for r in mb], train_ids=train_ids)
    out: list[tuple[_Row, torch.Tensor, losses.LossOutput]] = []
    row_inputs = [{k: v.to(device) for k, v in r.datum.loss_fn_inputs.items()} for r in mb]
    targets_B_T_K = _targets_B_T_K(row_inputs, T, device)
    with torch.set_grad_enabled(bool(train_ids)):
        # image rows (vision models): the model fills each row's image placeholders with vision features
        spans = [r.datum.spans for r in mb]
        images = {"images": spans} if any(spans) else {}
        hidden_B_T_D = model(tokens_B_T, lora=hook, **images)
        if train_ids:
            lp_B_T_K = _target_logprobs(
                model, bank, mb, requests, row_inputs, hidden_B_T_D, targets_B_T_K, train_ids
            )
        else:
            # One gather for the whole micro-batch (forward only: no graph).
            lp_B_T_K = model.logprobs(hidden_B_T_D, hook).gather(-1, targets_B_T_K)
        total: torch.Tensor | None = None
        for b, r in enumerate(mb):
            req = requests[r.request]
            n, targets = int(r.datum.tokens.numel()), row_inputs[b]["target_tokens"]
            lp = lp_B_T_K[b, :n, 0] if targets.dim() == 1 else lp_B_T_K[b, :n, : targets.shape[1]]
            if req.custom_loss is not None:
                loss = req.custom_loss.compute(lp, row_inputs[b])
            else:
                loss = losses.compute(req.loss_fn, lp, row_inputs[b], req.loss_fn_config)
            out.append((r, lp.detach(), loss))
            if not r.forward_only:
                total = loss.loss if total is None else total + loss.loss
        if total is not None and total.requires_grad:
            total.backward()
        for aid in train_ids:  # rows whose loss had no gradient left the unembedding out of the graph
            bank.ensure_grad(aid, "lm_head")
    return out


def forward_backward(
    model: CausalLM,
    bank: AdapterBank,
    requests: list[ForwardBackwardRequest],
    *,
    vocab_size: int,
    max_len: int,
    microbatch_tokens: int = DEFAULT_MICROBATCH_TOKENS,
) -> list[ForwardBackwardResult | TreadleError]:
    """Run every valid request in shared micro-batches; an invalid request fails alone (its slot holds the error)."""
    results: list[ForwardBackwardResult | TreadleError | None] = [None] * len(requests)
    rows: list[_Row] = []
    for i, req in enumerate(requests):
        try:
            validate_request(req, bank, vocab_size, max_len)
        except TreadleError as e:
            results[i] = e
            continue
        rows.extend(_Row(i, j, d, req.adapter_id, req.forward_only) for j, d in enumerate(req.data))

    per_datum: dict[tuple[int, int], tuple[torch.Tensor, losses.LossOutput]] = {}
    for mb in _microbatches(rows, microbatch_tokens):
        for r, lp, loss in _run_microbatch(model, bank, mb, requests):
            per_datum[(r.request, r.index)] = (lp, loss)

    for i, req in enumerate(requests):
        if results[i] is not None:
            continue
        done = [per_datum[(i, j)] for j in range(len(req.data))]
        results[i] = ForwardBackwardResult(
            loss_fn_outputs=[
                {"logprobs": lp.float().cpu()}
                # a custom loss is one scalar per datum: it has no per-token elementwise_loss
                | (
                    {}
                    if loss.elementwise_loss is None
                    else {"elementwise_loss": loss.elementwise_loss.float().cpu()}
                )
                for lp, loss in done
            ],
            metrics=losses.merge_metrics([loss for _, loss in done]),
        )
    return [r for r in results if r is not None]
