"""treadle: an open, self-hosted post-training platform (Tinker protocol + OpenAI API over multi-adapter LoRA)."""

import os

# treadle shares its CPU with the researcher's own loop (and, in the server, with its sampler and trainer
# threads). libgomp's default busy-waiting made every torch op ~10x slower as soon as other processes
# competed for the cores (a 15-token forward: 1.2-14 s instead of 0.25-0.4 s on 2 loaded cores), while
# purely passive waiting costs ~40% on an idle machine (135M forward p50: 172-184 ms vs 123 ms). A short
# spin before sleeping keeps both: 123 ms idle, 123-229 ms next to one or two CPU-bound processes.
# These must be set before libgomp loads, i.e. before torch is imported; a user's own values win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
