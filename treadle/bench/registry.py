"""The benchmarks `treadle bench NAME` runs (kept free of torch so the CLI's help stays fast)."""

# name -> "module:function"; the function takes (model, quick=...) and returns rows or (rows, extra).
BENCHMARKS: dict[str, str] = {
    "train": "treadle.bench.train:bench_train",
    "sample": "treadle.bench.sample:bench_sample",
    "api": "treadle.bench.api:bench_api",
    "determinism": "treadle.bench.determinism:bench_determinism",
    "tenants": "treadle.bench.tenants:bench_tenants",
    "tenants-api": "treadle.bench.tenants_api:bench_tenants_api",
    "traces": "treadle.bench.traces:bench_traces",
    "rl": "treadle.rl.async_bench:bench_rl",
    "custom_loss": "treadle.bench.custom_loss:bench_custom_loss",
    "vision": "treadle.bench.vision:bench_vision",
    "multiturn": "treadle.bench.multiturn:bench_multiturn",
    "sdk": "treadle.bench.sdk:bench_sdk",
    "ray": "treadle.bench.ray_replicas:bench_ray",
}
