#!/usr/bin/env bash
# The long fuzz: the same seeded suite as CI (tests/e2e/reliability/test_fuzz_routes.py) with more requests
# and a seed of your choice, against a real `treadle serve` on the tiny model.
#   bash scripts/fuzz_long.sh [REQUESTS] [SEED]      (defaults: 200000 requests, seed 11)
set -eu
cd "$(dirname "$0")/.."
export TREADLE_FUZZ_REQUESTS="${1:-200000}" TREADLE_FUZZ_SEED="${2:-11}"
exec python -m pytest -q -s -p no:cacheprovider tests/e2e/reliability/test_fuzz_routes.py
