"""A keyed `treadle serve` (two owners) on the tiny model, and a `World` of real ids each owner holds on it: a
session, a training run with saved weights and sampler weights, a sampler, a finished future. The fuzz,
isolation and abuse suites aim their requests at these ids so that they reach the checks behind the lookups."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import ServerProcess
from treadle.service.auth import hashed

ALICE = "tml-alice-reliability"
BOB = "tml-bob-reliability"


@dataclasses.dataclass
class World:
    """One owner's real identifiers on the server."""

    key: str
    session_id: str
    model_id: str
    run_id: str
    weights_path: str
    sampler_path: str
    external_path: str
    sampler_id: str
    request_id: str

    def ids(self) -> dict[str, list[str]]:
        kind, name = self.weights_path.split("/")[-2:]
        return {
            "session_id": [self.session_id],
            "model_id": [self.model_id],
            "run_id": [self.run_id],
            "sampler_id": [self.sampler_id],
            "request_id": [self.request_id],
            "tinker_path": [self.weights_path, self.sampler_path, self.external_path],
            "kind": [kind, "sampler_weights", "bogus"],
            "name": [name, self.sampler_path.split("/")[-1], "ckpt0"],
            "token": ["1.abc", "9999999999.AAAAAAAAAAAAAAAAAAAAAAAA"],
            "rel": ["adapter_model.safetensors", "../../treadle.db"],
        }


def datum(toks: list[int] | None = None) -> types.Datum:
    toks = toks or [1, 5, 9, 13, 17]
    return types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
    )


def build_world(server: ServerProcess, key: str) -> World:
    svc = tinker.ServiceClient(base_url=server.base_url, api_key=key)
    tc = svc.create_lora_training_client(base_model=server.model, rank=4).result()
    tc.forward_backward([datum()], "cross_entropy").result()
    weights = tc.save_state("fuzz-weights").result().path
    sampler = tc.save_weights_for_sampler("fuzz-sampler").result().path
    external = tc.save_weights_external("fuzz-external").result().path
    session_id = tc.model_id.rsplit(":train:", 1)[0]
    # The sampler and a finished future's id come from plain HTTP: the SDK keeps them private.
    head = {"X-API-Key": key}
    r = httpx.post(
        f"{server.base_url}/api/v1/create_sampling_session",
        json={"session_id": session_id, "sampling_session_seq_id": 900, "model_path": sampler},
        headers=head,
    )
    sampler_id = r.raise_for_status().json()["sampling_session_id"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    r = httpx.post(
        f"{server.base_url}/api/v1/asample",
        json={"sampling_session_id": sampler_id, "prompt": prompt, "sampling_params": {"max_tokens": 2}},
        headers=head,
    )
    request_id = r.raise_for_status().json()["request_id"]
    httpx.post(
        f"{server.base_url}/api/v1/retrieve_future", json={"request_id": request_id}, headers=head, timeout=60
    ).raise_for_status()
    return World(
        key, session_id, tc.model_id, tc.model_id, weights, sampler, external, sampler_id, request_id
    )


@pytest.fixture(scope="session")
def reliability_server(
    e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("reliability")
    keys_file = root / "keys"  # Bob's key is held only as its digest (treadle keys hash)
    keys_file.write_text(f"# hashed keys\n{hashed(BOB)} bob\n")
    server = ServerProcess(
        e2e_model_dir,
        root / "data",
        "--api-key",
        ALICE,
        "--api-keys-file",
        str(keys_file),
        "--max-request-mb",
        "4",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def worlds(reliability_server: ServerProcess) -> dict[str, World]:
    return {key: build_world(reliability_server, key) for key in (ALICE, BOB)}


def db_counts(data_dir: Path) -> dict[str, int]:
    """Rows per table of the server's SQLite DB (read-only, while it runs)."""
    con = sqlite3.connect(f"file:{data_dir / 'treadle.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        return {t: int(con.execute(f"select count(*) from {t}").fetchone()[0]) for t in tables}
    finally:
        con.close()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "treadle.db" not in p.name}
