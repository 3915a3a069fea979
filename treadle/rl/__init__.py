"""treadle.rl: agentic RL on any Tinker-compatible server, built on tinker-cookbook's `Env` / `rl.train`.

Client-side only: it talks to the server through the official SDK and never imports treadle's server layers.

Public API:
- `treadle.rl.envs.registry`: `env_names()`, `get_env(name) -> EnvSpec` (limits, tools, config keys,
  `make_tasks(split, config)`, `make_env(task, config) -> cookbook MessageEnv`), `load_manifest(name)`.
- `treadle.rl.envs.dataset.TreadleEnvDatasetBuilder(env_name=..., model_name=..., renderer_name=...,
  env_config={"level": 1})`: a cookbook `RLDatasetBuilder` for `rl.train.Config(dataset_builder=...)`;
  per-env subclasses: `SqlDatasetBuilder`, `TwentyQuestionsDatasetBuilder`, `ReactToolsDatasetBuilder`.
- Envs: `sql` (self-correcting SQL on generated SQLite DBs), `twenty_questions` (white-box oracle,
  information-gain reward), `react_tools` (word problems with a Python/calculator tool in the sandbox).
- `treadle.rl.sandbox`: `SubprocessSandbox` (the cookbook's `SandboxInterface` on local subprocesses with
  rlimits, a killed process group on timeout, no network) and `ReadOnlySqlite` (statement timeout, row/byte
  limits, writes refused).
- `treadle.rl.exploits`: per-env threat lists and scripted exploit policies checked against honest ones.
- `treadle.rl.training.build_config(env, {"key": "value"})` -> `rl.train.Config`; CLI:
  `treadle envs list|show NAME`, `treadle rl train ENV key=value ...`.
"""
