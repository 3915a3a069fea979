"""`treadle serve`: one process with the Tinker API (and the OpenAI API when available) over one worker per
served base model, backed by the metadata DB and checkpoint directory under `--data-dir`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from treadle.api.body_limit import BodyLimit
from treadle.api.errors import install_error_handlers
from treadle.errors import UserError, require
from treadle.service.limits import Limits

log = logging.getLogger("treadle.server")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "treadle" / "server"


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = dataclasses.field(default_factory=default_data_dir)
    db_url: str | None = None  # default: SQLite file in data_dir; any SQLAlchemy URL (Postgres) works
    models: list[str] = dataclasses.field(default_factory=list)  # empty = the embedded default model
    api_keys: list[str] = dataclasses.field(default_factory=list)  # empty (and no file) = open local mode
    api_keys_file: Path | None = None
    deterministic: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    session_timeout_s: float = 600.0
    sweep_interval_s: float = 30.0  # how often expired sessions and checkpoint TTLs are enforced
    max_request_bytes: int = 256 * 1024 * 1024
    max_lora_rank: int = 128
    kv_cache_mb: float = 2048  # each model's sampler KV cache grows no further; requests wait for room
    prefix_retention: bool = True  # finished requests' KV stays a prefix source (multi-turn prompts)
    ephemeral_samplers: int = 4  # in-memory sampler snapshots kept per training run
    limits: Limits = dataclasses.field(default_factory=Limits)  # backpressure: see treadle.service.limits
    image_dir: Path | None = None  # ImageAssetPointerChunk paths are read only under it; None = none read
    trace_keep: int | None = None  # deployment traces kept per deployment (newest); None = all
    trace_max_age_s: float | None = None  # deployment traces older than this are deleted; None = never
    # where engines run (treadle.engine.placement.pool): a child process per model by default
    placement: str = "subprocess"
    ray_address: str | None = None  # --ray ADDRESS; None with placement "ray": a local Ray runtime
    replicas: int = 1  # Ray: replicas of each model
    shards: int = 1  # FSDP2: ranks one model's blocks are sharded over
    worker_memory_headroom_mb: float | None = None  # a worker's memory cap beyond its loaded model

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> ServerConfig:
        cfg = cls(host=args.host, port=args.port)
        if getattr(args, "data_dir", None):
            cfg.data_dir = Path(args.data_dir).expanduser()
        cfg.db_url = getattr(args, "db_url", None)
        cfg.limits = Limits.from_args(args)
        cfg.models = list(getattr(args, "model", None) or [])
        cfg.api_keys = list(getattr(args, "api_key", None) or [])
        if getattr(args, "api_keys_file", None):
            cfg.api_keys_file = Path(args.api_keys_file)
        cfg.deterministic = bool(getattr(args, "deterministic", False))
        cfg.dtype = getattr(args, "dtype", "float32")
        cfg.device = getattr(args, "device", "cpu")
        ray = getattr(args, "ray", None)
        if ray is not None:
            cfg.placement = "ray"
            cfg.ray_address = ray or None
        elif getattr(args, "in_process", False):
            cfg.placement = "inprocess"
        cfg.replicas = int(getattr(args, "replicas", 1) or 1)
        cfg.shards = int(getattr(args, "shards", 1) or 1)
        headroom = getattr(args, "worker_memory_headroom_mb", None)
        if headroom is not None:
            require(headroom > 0, "--worker-memory-headroom-mb", f"must be > 0, got {headroom}")
            cfg.worker_memory_headroom_mb = float(headroom)
        if getattr(args, "session_timeout", None) is not None:
            cfg.session_timeout_s = float(args.session_timeout)
            cfg.sweep_interval_s = min(cfg.sweep_interval_s, max(cfg.session_timeout_s / 4, 0.5))
        if getattr(args, "max_request_mb", None) is not None:
            require(args.max_request_mb > 0, "--max-request-mb", f"must be > 0, got {args.max_request_mb}")
            cfg.max_request_bytes = int(args.max_request_mb * 2**20)
        if getattr(args, "kv_cache_mb", None) is not None:
            require(args.kv_cache_mb > 0, "--kv-cache-mb", f"must be > 0, got {args.kv_cache_mb}")
            cfg.kv_cache_mb = args.kv_cache_mb
        cfg.prefix_retention = not getattr(args, "no_prefix_retention", False)
        if getattr(args, "ephemeral_samplers", None) is not None:
            require(
                args.ephemeral_samplers >= 1,
                "--ephemeral-samplers",
                f"must be ≥ 1, got {args.ephemeral_samplers}",
            )
            cfg.ephemeral_samplers = args.ephemeral_samplers
        if getattr(args, "image_dir", None):
            cfg.image_dir = Path(args.image_dir).expanduser().resolve()
            require(cfg.image_dir.is_dir(), "--image-dir", f"{cfg.image_dir} is not a directory")
        if getattr(args, "trace_keep", None) is not None:
            require(args.trace_keep >= 1, "--trace-keep", f"must be ≥ 1, got {args.trace_keep}")
            cfg.trace_keep = args.trace_keep
        if getattr(args, "trace_max_age_days", None) is not None:
            days = args.trace_max_age_days
            require(days > 0, "--trace-max-age-days", f"must be > 0, got {days}")
            cfg.trace_max_age_s = days * 86400.0
        return cfg

    def model_names(self) -> list[str]:
        if self.models:
            return self.models
        from treadle.models.embedded import DEFAULT_MODEL

        return [DEFAULT_MODEL]


def _key_map(cfg: ServerConfig) -> dict[str, str] | None:
    from treadle.service.auth import owner_for_key, read_keys_file

    keys = {k: owner_for_key(k) for k in cfg.api_keys}
    if cfg.api_keys_file is not None:
        keys.update(read_keys_file(cfg.api_keys_file))
    return keys or None


def build_service(cfg: ServerConfig) -> Any:
    """Load every served model and open the store; returns the `TinkerService`."""
    from treadle.engine.placement.api import EngineSpec
    from treadle.engine.placement.pool import build_pool
    from treadle.service.auth import Authenticator
    from treadle.service.tinker_service import ServiceConfig, TinkerService
    from treadle.store import MetadataStore

    auth = Authenticator(_key_map(cfg))
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    names = cfg.model_names()
    if len(set(names)) != len(names):
        raise UserError(f"model: each model may be served once, got {names}", field="model")
    specs = [
        EngineSpec(
            name,
            dtype=cfg.dtype,
            device=cfg.device,
            deterministic=cfg.deterministic,
            max_lora_rank=cfg.max_lora_rank,
            kv_cache_mb=cfg.kv_cache_mb,
            prefix_retention=cfg.prefix_retention,
            shards=cfg.shards,
            memory_headroom_mb=cfg.worker_memory_headroom_mb,
        )
        for name in names
    ]
    log.info("starting %s (%s placement) …", ", ".join(names), cfg.placement)
    pool = build_pool(specs, cfg.placement, replicas=cfg.replicas, ray_address=cfg.ray_address)
    if cfg.placement != "inprocess":
        # The engines compute elsewhere: the few tensor ops here (decoding requests, encoding results) get one
        # thread, so this process keeps no OpenMP team of its own competing with the workers' for the cores.
        import torch

        torch.set_num_threads(1)
    store = MetadataStore(cfg.db_url or f"sqlite:///{cfg.data_dir / 'treadle.db'}")
    scfg = ServiceConfig(
        data_dir=cfg.data_dir,
        session_timeout_s=cfg.session_timeout_s,
        ephemeral_samplers_per_model=cfg.ephemeral_samplers,
        image_dir=cfg.image_dir,
    )
    return TinkerService(scfg, store, pool, auth, cfg.limits)


def build_app(config: ServerConfig) -> FastAPI:
    from treadle.api.tinker import make_router

    service = build_service(config)

    deployments = _deployments(service, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_sweeper(service, config.sweep_interval_s, deployments))
        try:
            yield
        finally:
            task.cancel()
            service.close()

    app = FastAPI(title="treadle", lifespan=lifespan)
    app.state.service = service
    app.state.deployments = deployments
    app.state.max_request_bytes = config.max_request_bytes  # also bounds a decompressed body
    install_error_handlers(app)

    app.add_middleware(BodyLimit, limit=config.max_request_bytes, body_timeout_s=config.limits.body_timeout_s)

    app.include_router(make_router(service))
    _mount_openai(app, service, deployments)
    return app


def _deployments(service: Any, cfg: ServerConfig) -> Any:
    """Deployments, traces and feedback (`treadle.service.deployments`), with their routes' dependencies."""
    from treadle.service.deployments import Deployments
    from treadle.service.traces import Retention, Traces
    from treadle.store.traces import TraceStore

    store = TraceStore(service.store)
    return Deployments(service, store, Traces(store, Retention(cfg.trace_keep, cfg.trace_max_age_s)))


def _mount_openai(app: FastAPI, service: Any, deployments: Any) -> None:
    from treadle.api.deployments import make_router as deployments_router

    app.include_router(deployments_router(deployments))
    try:
        from treadle.api.openai import make_router as openai_router
    except ImportError:  # the OpenAI front end is optional; the Tinker API works without it
        return
    from treadle.service.openai_backend import ServiceOpenAIBackend

    app.include_router(openai_router(ServiceOpenAIBackend(service), deployments))


async def _sweeper(service: Any, interval_s: float, deployments: Any = None) -> None:
    """Enforce session timeouts, checkpoint TTLs and trace retention in the background."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            expired = service.sessions.expire_sessions()
            if expired:
                log.info("expired %d silent session(s)", len(expired))
            service.checkpoints.sweep_expired_checkpoints()
            if deployments is not None:
                pruned = await asyncio.to_thread(deployments.traces.prune)
                if pruned:
                    log.info("trace retention: deleted %d trace(s)", pruned)
        except Exception:
            log.exception("sweeper failed")


def serve(config: ServerConfig) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_app(config)
    url = f"http://{config.host}:{config.port}"
    # Never print a real key (issue 11: keys are not logged); in closed mode the user has theirs.
    key = "<one of your API keys>" if config.api_keys or config.api_keys_file else "tml-local"
    print(f"treadle serving on {url}", flush=True)
    print(f"models: {', '.join(config.model_names())}", flush=True)
    print(f"data dir: {config.data_dir}", flush=True)
    print("point the tinker SDK / cookbook at it:", flush=True)
    print(f"  export TINKER_BASE_URL={url}", flush=True)
    print(f"  export TINKER_API_KEY={key}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


if __name__ == "__main__":
    from treadle.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
