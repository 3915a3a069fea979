"""Fuzz every route of a real keyed server with malformed requests (seeded hypothesis; TREADLE_FUZZ_EXAMPLES
sets how many, 10^4 by default): no answer >= 500, no dropped connection, every refusal a 4xx naming the field,
and refusals leave nothing behind (no sessions, runs, futures or files beyond what the accepted requests made).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.e2e.conftest import ServerProcess
from tests.e2e.reliability.conftest import ALICE, BOB, World, db_counts, files_under
from tests.e2e.reliability.fuzzer import Ids, Probe, probes, problem

pytestmark = pytest.mark.slow

REQUESTS = int(os.environ.get("TREADLE_FUZZ_REQUESTS", "10000"))  # eight requests per drawn example
SEED = int(os.environ.get("TREADLE_FUZZ_SEED", "11"))


def _send(client: httpx.Client, p: Probe) -> httpx.Response:
    return client.request(p.method, p.path, headers=p.headers, content=p.content)


def variants(p: Probe) -> list[Probe]:
    """Each drawn request as drawn and in seven variants (the other owner's key, anonymous, an unknown key, the
    Content-Type swapped, none, a lying Content-Encoding, the body cut short): eight requests per draw, since
    drawing is the fuzzer's cost and sending is cheap."""
    head = p.headers
    other = BOB if head.get("X-API-Key") == ALICE else ALICE
    anon = {k: v for k, v in head.items() if k != "X-API-Key"}
    ctype = head.get("Content-Type", "")
    swapped = "application/json" if "protobuf" in ctype else "application/x-protobuf"
    untyped = {k: v for k, v in head.items() if k != "Content-Type"}
    body = p.content or b""
    return [
        p,
        dataclasses.replace(p, headers={**head, "X-API-Key": other}),
        dataclasses.replace(p, headers=anon),
        dataclasses.replace(p, headers={**head, "X-API-Key": "tml-" + "z" * 40}),
        dataclasses.replace(p, headers={**head, "Content-Type": swapped}),
        dataclasses.replace(p, headers=untyped),
        dataclasses.replace(p, headers={**head, "Content-Encoding": "gzip"}),
        dataclasses.replace(p, content=body[: len(body) // 2]),
    ]


def test_fuzz_every_route(reliability_server: ServerProcess, worlds: dict[str, World]) -> None:
    values: dict[str, list[str]] = collections.defaultdict(list)
    for w in worlds.values():
        for k, v in w.ids().items():
            values[k].extend(v)
    values["base_model"] = [reliability_server.model, "nope"]
    values["model"] = [reliability_server.model, worlds[ALICE].sampler_path]
    ids = Ids(dict(values))
    keys: list[str | None] = [ALICE, ALICE, BOB, None, "tml-unknown", "not-a-key", ""]

    data_dir = reliability_server.data_dir
    before_rows, before_files = db_counts(data_dir), files_under(data_dir)
    problems: collections.Counter[str] = collections.Counter()
    examples: dict[str, Probe] = {}
    statuses: collections.Counter[int] = collections.Counter()
    timings: dict[str, float] = collections.defaultdict(float)
    accepted: collections.Counter[str] = collections.Counter()
    sent = 0

    client = httpx.Client(base_url=reliability_server.base_url, timeout=60)

    @seed(SEED)
    @settings(
        max_examples=REQUESTS // 8,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal sent
        drawn = data.draw(probes(ids, keys))
        for p in variants(drawn):
            sent += 1
            t = time.monotonic()
            try:
                resp = _send(client, p)
            except httpx.HTTPError as e:  # a dropped connection or a hang
                why: str | None = f"no response: {type(e).__name__}: {e}"
            else:
                statuses[resp.status_code] += 1
                why = problem(resp)
                if resp.status_code < 300:
                    accepted[p.path.split("?")[0].rsplit("/", 1)[-1]] += 1
                    if p.method == "DELETE":  # a valid delete of a seeded checkpoint may shrink a table
                        accepted["DELETE"] += 1
            route = p.method + " " + p.path.split("?")[0][:40]
            timings[route.split("/")[-1][:30]] += time.monotonic() - t
            if why is not None:
                key = why.split(":")[0] + " @ " + route
                problems[key] += 1
                examples.setdefault(key + " | " + why[:200], p)

    t0 = time.monotonic()
    run()
    elapsed = time.monotonic() - t0
    client.close()
    print("slowest routes (s):", sorted(timings.items(), key=lambda kv: -kv[1])[:8])
    print(f"fuzz: {sent} requests in {elapsed:.1f}s, statuses {dict(sorted(statuses.items()))}")
    detail = "\n".join(f"{k}: {v!r}"[:600] for k, v in list(examples.items())[:40])
    assert not problems, f"{sum(problems.values())} bad answers of {sent}:\n{detail}"
    assert sent >= REQUESTS * 0.9
    assert reliability_server.proc is not None and reliability_server.proc.poll() is None
    # Refusals leave nothing behind: every new row and checkpoint directory is owed to an accepted request.
    after = db_counts(data_dir)
    grown = {t: after[t] - before_rows.get(t, 0) for t in after if after[t] != before_rows.get(t, 0)}
    allowed = {
        "sessions": accepted["create_session"],
        "training_runs": accepted["create_model"] + accepted["load_weights"] + accepted["copy_weights"],
        "sampling_sessions": accepted["create_sampling_session"],
        "checkpoints": accepted["save_weights"]
        + accepted["save_weights_for_sampler"]
        + accepted["copy_weights"],
        "futures": sum(accepted.values()),
    }
    for table, n in grown.items():
        low = -accepted["DELETE"] if table == "checkpoints" else 0
        assert low <= n <= allowed.get(table, 0), f"{table}: {n} new rows, {allowed.get(table, 0)} accepted"
    new_dirs = {f.rsplit("/", 1)[0] for f in files_under(data_dir) - before_files}
    assert len(new_dirs) <= allowed["checkpoints"] + 1, sorted(new_dirs)[:20]  # +1: the signing key
