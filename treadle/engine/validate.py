"""Whether a request is usable by a model, as pure functions of the request and the model's limits: one source
for the service's edge (a bad request is a 400 naming the field before any future exists) and for the engine's
own guard (a caller of the `Engine` Python API gets the same answer with the same limits).

Nothing here depends on state that can change while a request waits (which adapters are loaded): those checks
stay where the request runs.
"""

from __future__ import annotations

from treadle.engine import losses, prompt_extras
from treadle.engine.types import ForwardBackwardRequest, SampleRequest
from treadle.errors import UserError, require

# Top-k prompt logprobs are (prompt length × k) pairs in the response: bounded so one request cannot ask for a
# response the size of prompt × vocabulary.
MAX_TOPK_PROMPT_LOGPROBS = 100


def forward_backward_data(req: ForwardBackwardRequest, vocab_size: int, max_len: int) -> None:
    """Raise a UserError naming the field (`data[i].model_input`, `data[i].loss_fn_inputs.<key>`, `loss_fn`,
    `loss_fn_config`, …) if the request cannot run on a model with this vocabulary and context length.

    Image chunks must already be expanded into their tokens (`Worker.prepare_forward_backward`)."""
    if req.adapter_id is None and not req.forward_only:
        raise UserError(
            "model_id: forward_backward needs a LoRA adapter (the base model is frozen)", field="model_id"
        )
    if not req.data:
        raise UserError("data: must contain at least one datum", field="data")
    for i, d in enumerate(req.data):
        field = f"data[{i}].model_input"
        n = int(d.tokens.numel())
        if n == 0:
            raise UserError(f"{field}: must contain at least one token", field=field)
        if n > max_len:
            raise UserError(
                f"{field}: {n} tokens exceed the model's max_context_length {max_len}", field=field
            )
        lo, hi = int(d.tokens.min()), int(d.tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise UserError(
                f"{field}: token ids must be in 0..{vocab_size - 1}, got {lo if lo < 0 else hi}", field=field
            )
        try:
            if req.custom_loss is not None:
                req.custom_loss.validate(d.loss_fn_inputs, n, vocab_size)
            else:
                losses.validate(req.loss_fn, d.loss_fn_inputs, req.loss_fn_config, n, vocab_size)
        except UserError as e:
            if e.field is not None and e.field.startswith("loss_fn_inputs"):  # about this datum
                raise UserError(f"data[{i}].{e.message}", field=f"data[{i}].{e.field}") from None
            raise  # about the request (loss_fn, loss_fn_config): the same for every datum


def sample_request(
    req: SampleRequest,
    *,
    vocab_size: int,
    max_context_length: int,
    can_decode: bool = True,
    max_num_samples: int | None = None,
) -> None:
    """Raise a UserError naming the field if the request cannot be sampled from a model with this vocabulary and
    context length. `can_decode`: whether string stops can be matched (the sampler has a tokenizer);
    `max_num_samples`: the server's cap on samples per request (None: no cap beyond ≥ 1)."""
    require(len(req.prompt) > 0, "prompt", "must contain at least one token")
    require(all(isinstance(t, int) for t in req.prompt), "prompt", "token ids must be integers")
    lo, hi = min(req.prompt), max(req.prompt)
    require(
        lo >= 0 and hi < vocab_size,
        "prompt",
        f"token ids must be in 0..{vocab_size - 1}, got {lo if lo < 0 else hi}",
    )
    cap = f"in 1..{max_num_samples}" if max_num_samples is not None else "≥ 1"
    require(
        isinstance(req.num_samples, int)
        and not isinstance(req.num_samples, bool)
        and 1 <= req.num_samples <= (max_num_samples or req.num_samples),
        "num_samples",
        f"must be an integer {cap}, got {req.num_samples!r}",
    )
    k_max = min(MAX_TOPK_PROMPT_LOGPROBS, vocab_size)
    require(
        type(req.topk_prompt_logprobs) is int and 0 <= req.topk_prompt_logprobs <= k_max,
        "topk_prompt_logprobs",
        f"must be an integer in 0..{k_max}, got {req.topk_prompt_logprobs!r}",
    )
    prompt_extras.validate(req, vocab_size)
    p = req.params
    p.validate(vocab_size)
    require(
        p.seed is None or (isinstance(p.seed, int) and not isinstance(p.seed, bool)),
        "sampling_params.seed",
        f"must be an integer, got {p.seed!r}",
    )
    total = len(req.prompt) + p.max_tokens
    require(
        total <= max_context_length,
        "sampling_params.max_tokens",
        f"prompt ({len(req.prompt)} tokens) + max_tokens ({p.max_tokens}) = {total} exceeds the model's "
        f"max_context_length {max_context_length}",
    )
    if not can_decode and any(isinstance(s, str) for s in p.stop or ()):
        raise UserError(
            "sampling_params.stop: string stops need a tokenizer; this sampler has none, "
            "pass stop token ids instead",
            field="sampling_params.stop",
        )
