"""rlhf-stages: staged post-training (SFT -> reward model -> DPO/PPO/GRPO/RLOO) on one registry.

The layers, top to bottom (README, "Architecture"; checked by import-linter, see pyproject.toml):
- entry points: `cli` (the `rlhf` command), `recipe` (stages as processes), `report` (HTML run reports);
- the stages: `sft`, `reward_model`, `policy` (with `algorithms`), each one `StageRun` block;
- `trainers` (TRL glue) and `lifecycle` (StageRun, the shared stage config);
- `evaluation`: the held-out metrics every stage reports;
- `ppo/` (our PPO trainer) and `reward/` (reward modelling, a top-level package);
- `data/` (formats, mixtures, batching), `tasks/` (the embedded world);
- `generation` (sampling, greedy decoding, left padding) and `logprobs` (torch-only log-prob math);
- `core/`: config, errors, registry, secrets, tracking, distributed, models, checkpoints, files, paths.
A module imports only from layers below its own.
"""
