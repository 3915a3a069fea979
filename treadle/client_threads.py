"""Client-side thread settings: keep a client program's own torch/OpenMP threads off the server's cores.

A client on the same machine as `treadle serve` (an RL script, the learner, `treadle bench`'s SDK side) often
computes a little with torch itself: advantages, rewards, tokenization to tensors. torch then starts an
OpenMP team as large as the machine (2 threads on 2 cores) whose threads compete with the server's team
for the same cores while the server trains or samples. `limit_client_threads()` caps the client at one
compute thread (its work is small) and makes idle OpenMP threads sleep instead of spinning.

Safe to import from any client program: it imports nothing from the server layers and imports torch only
if the program already did (`sys.modules`), so it never loads torch itself.
"""

from __future__ import annotations

import os
import sys

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_client_threads(threads: int = 1) -> int:
    """Cap this process's torch/BLAS compute threads at `threads` (default 1); returns the cap in effect.

    Call it at the top of a client script, ideally before `import torch` (then the environment variables
    apply from the start, and child processes inherit them). A value the user already exported wins over
    the default. Raises ValueError for a `threads` below 1.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads: must be an integer >= 1, got {threads!r}")
    for var in _THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cap = int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else threads
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(cap)
    return cap
