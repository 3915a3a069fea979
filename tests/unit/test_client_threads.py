"""treadle.client_threads: a client program caps its own torch threads without loading torch or server layers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from treadle.client_threads import limit_client_threads

_PROBE = """
import sys
from treadle.client_threads import limit_client_threads
server = [m for m in sys.modules if m.split(".")[:2][-1] in {"api", "service", "store", "engine", "lora", "models", "ops"}
          and m.startswith("treadle.")]
assert "torch" not in sys.modules and not server, (server, "torch" in sys.modules)
import torch
before = torch.get_num_threads()
cap = limit_client_threads()
print(before, cap, torch.get_num_threads(), __import__("os").environ["OMP_NUM_THREADS"])
"""


def test_caps_torch_threads_in_a_fresh_client_process() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    before, cap, after, omp = (int(v) for v in out)
    assert (cap, after, omp) == (1, 1, 1)
    assert before >= 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_rejects_a_thread_count_below_one_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="threads: must be an integer >= 1"):
        limit_client_threads(bad)  # type: ignore[arg-type]
