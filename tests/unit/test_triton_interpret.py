"""The Triton kernels' logic, batch invariance included, checked on CPU under `TRITON_INTERPRET=1`.

The interpreter must be switched on before triton is first imported, so the checks run in a child
interpreter (the rest of the suite keeps a normal triton). Sizes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHILD = textwrap.dedent(
    """
    import random
    import torch
    import torch.nn.functional as F
    from treadle.ops import triton_kernels as tk

    failures = []

    def check(name, ok):
        if not ok:
            failures.append(name)

    def rows_alone_vs_batched(name, op, x, rng):
        solo = [op(x[i : i + 1]) for i in range(x.shape[0])]
        for M in [1, 2, 3, 5, 8, 17, 33, 64]:
            idx = [rng.randrange(x.shape[0]) for _ in range(M)]
            out = op(x[idx])
            for pos, i in enumerate(idx):
                check(f"{name}: row {i} at {pos} of {M}", torch.equal(out[pos : pos + 1], solo[i]))

    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    close = dict(rtol=1e-5, atol=1e-5)

    W, b = torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    x = torch.randn(24, 48, generator=g)
    rows_alone_vs_batched("linear", lambda t: tk.linear(t, W, b), x, rng)
    check("linear accuracy", torch.allclose(tk.linear(x, W, b), F.linear(x, W, b), **close))
    a3, b3 = torch.randn(4, 9, 20, generator=g), torch.randn(4, 20, 12, generator=g)
    check("bmm accuracy", torch.allclose(tk.bmm(a3, b3), torch.bmm(a3, b3), **close))
    check("bmm broadcast", torch.allclose(tk.bmm(a3, b3[:1]), torch.bmm(a3, b3[:1].expand(4, 20, 12)), **close))

    w = torch.randn(1100, generator=g)
    xr = torch.randn(16, 1100, generator=g) * 3  # longer than one ROW_BLOCK
    rows_alone_vs_batched("rmsnorm", lambda t: tk.rmsnorm(t, w, 1e-6), xr, rng)
    ref = w * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
    check("rmsnorm accuracy", torch.allclose(tk.rmsnorm(xr, w, 1e-6), ref, **close))
    for log in (True, False):
        rows_alone_vs_batched(f"softmax log={log}", lambda t: tk.softmax_lastdim(t, log), xr, rng)
        ref = torch.log_softmax(xr, -1) if log else torch.softmax(xr, -1)
        check(f"softmax log={log} accuracy", torch.allclose(tk.softmax_lastdim(xr, log), ref, **close))
    rows_alone_vs_batched("sum", lambda t: tk.sum_lastdim(t), xr, rng)
    check("sum accuracy", torch.allclose(tk.sum_lastdim(xr), xr.sum(-1), rtol=1e-5, atol=1e-4))

    def causal(T, S):
        return torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]

    H, d, T = 2, 24, tk.ATTN_BLOCK_N + 11  # two KV blocks; head dim not a power of two
    q, k, v = (torch.randn(1, T, H, d, generator=g).transpose(1, 2) for _ in range(3))
    full = tk.attention(q, k, v, causal(T, T)[None], d**-0.5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal(T, T)[None, None], scale=d**-0.5)
    check("attention accuracy", torch.allclose(full, ref, **close))
    for t in [0, 5, tk.ATTN_BLOCK_N - 1, tk.ATTN_BLOCK_N, T - 1]:
        S = t + 1
        ones = torch.ones(1, 1, S, dtype=torch.bool)
        dec = tk.attention(q[:, :, t : t + 1], k[:, :, :S], v[:, :, :S], ones, d**-0.5)
        check(f"attention decode {t}", torch.equal(dec[0, :, 0], full[0, :, t]))
        extra = rng.choice([3, tk.ATTN_BLOCK_N + 1])
        k_pad = torch.cat([k[:, :, :S], 50 * torch.randn(1, H, extra, d, generator=g)], dim=2)
        v_pad = torch.cat([v[:, :, :S], 50 * torch.randn(1, H, extra, d, generator=g)], dim=2)
        mask = torch.zeros(1, 1, S + extra, dtype=torch.bool)
        mask[..., :S] = True
        pad = tk.attention(q[:, :, t : t + 1], k_pad, v_pad, mask, d**-0.5)
        check(f"attention padded decode {t}", torch.equal(pad[0, :, 0], full[0, :, t]))
    for Bsz in [2, 5]:
        pos = rng.randrange(Bsz)
        Tmax = T + 9
        qb, kb, vb = (torch.randn(Bsz, H, Tmax, d, generator=g) for _ in range(3))
        qb[pos, :, :T], kb[pos, :, :T], vb[pos, :, :T] = q[0], k[0], v[0]
        mask = causal(Tmax, Tmax)[None].repeat(Bsz, 1, 1)
        mask[pos, :, T:] = False
        out = tk.attention(qb, kb, vb, mask, d**-0.5)
        check(f"attention batch {Bsz}", torch.equal(out[pos, :, :T], full[0]))

    print("FAILURES:", failures if failures else "none")
    raise SystemExit(1 if failures else 0)
    """
)


@pytest.mark.slow
def test_triton_kernels_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
