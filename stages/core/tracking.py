"""Weights & Biases: online when credentials exist, offline otherwise; never a prompt, never secrets.

The stage opens the run itself (project, group, job_type, name, scrubbed config) before building the
trainer; HF Trainer's W&B callback then reuses that run instead of opening its own.
"""

from __future__ import annotations

import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stages.core.secrets import scrub, scrub_argv


@dataclass
class TrackingConfig:
    """Where and how a stage logs."""

    report_to: Literal["wandb", "none"] = field(default="wandb", metadata={"help": "'wandb' or 'none'."})
    project: str = field(default="rlhf-stages", metadata={"help": "W&B project."})
    group: str | None = field(default=None, metadata={"help": "W&B group; a recipe sets one group for all its stages."})
    mode: Literal["auto", "online", "offline"] = field(
        default="auto", metadata={"help": "'auto' = online when W&B credentials exist, offline otherwise."}
    )
    entity: str | None = field(default=None, metadata={"help": "W&B entity (team or user)."})
    tags: list[str] = field(default_factory=list, metadata={"help": "W&B tags."})


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        netrc_file = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in netrc_file.hosts)


def start_run(tracking: TrackingConfig, run_name: str, job_type: str, config: dict[str, Any], run_dir: Path) -> Any | None:
    """Open the W&B run of this stage on the main process; returns it (or None when tracking is off)."""
    if tracking.report_to != "wandb":
        return None
    import wandb

    mode = tracking.mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
    run_dir.mkdir(parents=True, exist_ok=True)
    # W&B records the command line (sys.argv) in the run's metadata; `train.hub_token=...` must not go with it.
    argv, sys.argv = sys.argv, sys.argv[:1] + scrub_argv(sys.argv[1:])
    try:
        return wandb.init(
            project=tracking.project,
            entity=tracking.entity,
            group=tracking.group,
            job_type=job_type,
            name=run_name,
            tags=scrub(tracking.tags) or None,
            config=scrub(config),
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
    finally:
        sys.argv = argv


def run_path(run: Any | None) -> str | None:
    """`entity/project/id` online; the local run directory offline."""
    if run is None:
        return None
    if run.settings.mode == "offline":
        return str(Path(run.dir).parent)
    return run.path if isinstance(run.path, str) else "/".join(run.path)


def log(run: Any | None, metrics: dict[str, Any]) -> None:
    if run is not None:
        run.log(scrub(metrics))


def log_table(run: Any | None, key: str, rows: list[dict[str, Any]]) -> None:
    """Log sample generations (prompt, response, reward, ...) as a W&B table."""
    if run is None or not rows:
        return
    import wandb

    columns = list(rows[0])
    run.log({key: wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])})


def finish(run: Any | None, summary: dict[str, Any]) -> None:
    if run is None:
        return
    run.summary.update(scrub(summary))
    run.finish()
