"""treadle: an open, self-hosted post-training platform (Tinker protocol + OpenAI API over multi-adapter LoRA)."""

import os

# treadle shares its CPU with the researcher's own loop (and, in the server, with its sampler and trainer
# threads). OpenMP's default busy-waiting makes every torch op ~10x slower as soon as another process
# competes for the cores (measured: a 15-token forward took 1.2-14 s instead of 0.25-0.4 s on 2 loaded
# cores). Passive waiting must be set before libgomp loads, i.e. before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
