"""Hot swap under load (issue 14 §5): 16 concurrent `openai` clients, streaming and not, call one deployment
while it is promoted 10 times. Zero requests fail; every response names exactly one version in its header, and
its whole text is that version's greedy output (so none is mixed, also for streams that began before a promotion
and ended after it); its trace records the same version.

A real `treadle serve` in deterministic mode on the tiny model, so a greedy reply depends only on the weights,
never on which other requests shared the batch; two sampler checkpoints made with the official SDK whose greedy
replies differ."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from openai import OpenAI
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

CLIENTS = 16
PROMOTIONS = 10
PROMPTS = ["Tell me a story.", "What is the capital of France?"]
MAX_TOKENS = 24


@dataclasses.dataclass
class Served:
    prompt: str
    stream: bool
    version: int
    text: str
    completion_id: str
    started: float  # the response's headers arrived (its version was fixed)
    finished: float


@pytest.fixture(scope="module")
def server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(e2e_model_dir, tmp_path_factory.mktemp("hotswap") / "server", "--deterministic")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _checkpoints(server: ServerProcess) -> list[str]:
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=server.model, rank=8, seed=0).result()
    first = tc.save_weights_for_sampler("swap-a").result().path
    toks = list(range(100, 140))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
    )
    for _ in range(3):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=0.1))
    return [first, tc.save_weights_for_sampler("swap-b").result().path]


def _ask(client: OpenAI, model: str, prompt: str, stream: bool) -> Served:
    msgs: Any = [{"role": "user", "content": prompt}]
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=msgs,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        got = time.monotonic()
        out = raw.parse()
        version = int(raw.headers.get("X-Treadle-Deployment-Version", "0"))
        return Served(prompt, False, version, out.choices[0].message.content or "", out.id, got, got)
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=msgs,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    ) as raw:
        started = time.monotonic()
        version = int(raw.headers.get("X-Treadle-Deployment-Version", "0"))
        parts, cid = [], ""
        for chunk in raw.parse():
            cid = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    return Served(prompt, True, version, "".join(parts), cid, started, time.monotonic())


def test_promotions_under_load_fail_nothing_and_mix_nothing(server: ServerProcess) -> None:
    paths = _checkpoints(server)
    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    expected = {(p, q): _ask(client, p, q, False).text for p in paths for q in PROMPTS}
    assert all(expected[paths[0], q] != expected[paths[1], q] for q in PROMPTS), expected

    api = httpx.Client(base_url=server.base_url, headers={"X-API-Key": API_KEY}, timeout=300)
    assert api.post("/api/v1/deployments", json={"name": "swap", "model_path": paths[0]}).status_code == 201

    served: list[Served] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def user(i: int) -> None:
        mine = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        k = 0
        while not stop.is_set():
            try:
                s = _ask(mine, "swap", PROMPTS[(i + k) % len(PROMPTS)], stream=(i + k) % 2 == 0)
            except BaseException as e:  # every failure counts, whatever its kind
                with lock:
                    failures.append(e)
            else:
                with lock:
                    served.append(s)
            k += 1

    threads = [threading.Thread(target=user, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    promotions: list[tuple[float, float]] = []  # (request sent, answer received)
    try:
        time.sleep(1.0)
        for n in range(PROMOTIONS):
            sent = time.monotonic()
            r = api.post("/api/v1/deployments/swap/promote", json={"model_path": paths[(n + 1) % 2]})
            promotions.append((sent, time.monotonic()))
            assert r.status_code == 200 and r.json()["version"] == n + 2, r.text
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)

    assert failures == [], failures[:3]
    history = api.get("/api/v1/deployments/swap").json()["history"]
    path_of = {h["version"]: h["model_path"] for h in history}
    assert len(path_of) == PROMOTIONS + 1
    for s in served:
        assert s.version in path_of, s  # exactly one version, named in the header
        assert s.text == expected[path_of[s.version], s.prompt], s  # all of it from that version
    # Promotions really happened under load: several versions served traffic, and some streams that began
    # before a promotion finished after it (on their own version, as checked above).
    assert len({s.version for s in served}) >= PROMOTIONS // 2
    spanning = [
        s for s in served if s.stream and any(s.started < a and s.finished > b for a, b in promotions)
    ]
    print(
        f"hot swap: {len(served)} responses ({sum(s.stream for s in served)} streamed) from {CLIENTS} clients, "
        f"{len({s.version for s in served})} versions served, {len(spanning)} streams spanned a promotion"
    )
    assert spanning, "no stream spanned a promotion; the load is too light to test the swap"
    # Each response's trace records the version its header named.
    for s in served[:: max(1, len(served) // 40)]:
        trace = api.get(f"/api/v1/traces/{s.completion_id}").json()
        assert (trace["version"], trace["completion_text"]) == (s.version, s.text)
