"""The SGMV/BGMV LoRA kernels (treadle.ops.triton_lora) equal the PyTorch grouped path, under `TRITON_INTERPRET=1`.

The interpreter must be switched on before triton is first imported, so the checks run in a child
interpreter (as tests/unit/test_triton_interpret.py does). Sizes are tiny: the interpreter is slow.
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
    import torch
    from treadle.ops import triton_lora as tl_lora

    failures = []

    def check(name, ok):
        if not ok:
            failures.append(name)

    g = torch.Generator().manual_seed(0)
    K, N = 40, 24
    ranks, scales = [4, 8, 3], [2.0, 0.5, 4.0]
    A = [torch.randn(r, K, generator=g) for r in ranks]
    B = [torch.randn(N, r, generator=g) for r in ranks]
    a_stack, b_stack = tl_lora.stack_padded(A, 0), tl_lora.stack_padded(B, 1)
    scale = torch.tensor(scales)

    def reference(x, adapter_of_row):
        # the PyTorch path of treadle.lora.routing: scale * (x A^T) B^T per row's adapter, 0 without one
        out = torch.zeros(x.shape[0], N)
        for i, w in enumerate(adapter_of_row):
            if w >= 0:
                out[i] = ((x[i : i + 1] @ A[w].T) @ B[w].T)[0] * scales[w]
        return out

    # segments as the grouped hook makes them: a1 x4, base x1, a0 x9 (longer than a tile), a2 x2
    segs = [(1, 4), (-1, 1), (0, 9), (2, 2)]
    rows = [w for w, n in segs for _ in range(n)]
    x = torch.randn(len(rows), K, generator=g)
    starts = torch.tensor([sum(n for _, n in segs[:i]) for i in range(len(segs))])
    lens = torch.tensor([n for _, n in segs])
    widx = torch.tensor([w for w, _ in segs])
    ref = reference(x, rows)
    for inv in (False, True):
        got = tl_lora.lora_sgmv(x, a_stack, b_stack, scale, starts, lens, widx, invariant=inv)
        check(f"sgmv invariant={inv} equals torch", torch.allclose(got, ref, rtol=1e-5, atol=1e-5))
        base = torch.randn(len(rows), N, generator=g)
        added = tl_lora.lora_sgmv(x, a_stack, b_stack, scale, starts, lens, widx, base_M_N=base.clone(), invariant=inv)
        check(f"sgmv add invariant={inv}", torch.allclose(added, base + ref, rtol=1e-5, atol=1e-5))
        check(f"sgmv add keeps base rows invariant={inv}", torch.equal(added[4], base[4]))

    # invariant variant: a row alone == the row inside the batch, bitwise
    full = tl_lora.lora_sgmv(x, a_stack, b_stack, scale, starts, lens, widx, invariant=True)
    one = lambda w: torch.tensor([w])
    for i in (0, 3, 4, 5, 13, 15):  # rows of every segment, first and last rows of a multi-tile segment
        w = rows[i]
        alone = tl_lora.lora_sgmv(x[i : i + 1], a_stack, b_stack, scale, one(0), one(1), one(w), invariant=True)
        check(f"invariant row {i} alone", torch.equal(alone[0], full[i]))

    # BGMV: decode rows in any order, each with its own adapter
    order = [2, 0, -1, 1, 0, 2, 1]
    xd = torch.randn(len(order), K, generator=g)
    for inv in (False, True):
        got = tl_lora.bgmv(xd, a_stack, b_stack, scale, torch.tensor(order), invariant=inv)
        check(f"bgmv invariant={inv} equals torch", torch.allclose(got, reference(xd, order), rtol=1e-5, atol=1e-5))

    print("FAILURES:", failures if failures else "none")
    raise SystemExit(1 if failures else 0)
    """
)


@pytest.mark.slow
def test_lora_kernels_equal_the_torch_path_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
