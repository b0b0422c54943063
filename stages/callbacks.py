"""HF Trainer callbacks the TRL-based stages share (added by `common.train`).

Kept out of `stages/common.py` so that importing the plumbing (the CLI's registry commands do) does not
import transformers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm; stopped before it reached a checkpoint."""


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first logged non-finite loss or gradient norm, naming the step and the last good checkpoint.

    The logged loss is the mean over the steps since the previous log, gathered across processes, so every
    rank stops at the same step (`common.trl_args` turns off HF's `logging_nan_inf_filter`, which would
    otherwise replace a NaN step loss by the running mean). A step that saves a checkpoint is always logged
    first, so no checkpoint is written after a non-finite step: the newest one on disk is the last good one.
    The checkpoints' `training_args.bin` (a pickle of every argument, `hub_token` included) is removed; the
    stage's scrubbed `stage_config.json` records the configuration instead, and resuming does not need it.
    """

    def __init__(self, stage: str, output_dir: str | Path) -> None:
        self.stage, self.output_dir, self.last_checked_step = stage, Path(output_dir), 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save:
            control.should_log = True  # check this step's loss before its checkpoint is written
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        bad = {key: logs[key] for key in ("loss", "grad_norm") if key in logs and not math.isfinite(logs[key])}
        if bad:
            from stages.common import last_checkpoint

            first, last = self.last_checked_step + 1, state.global_step
            steps = f"step {last}" if first >= last else f"steps {first}-{last} (logged together)"
            checkpoint = last_checkpoint(self.output_dir)
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been written yet"
            values = " and ".join(f"{key}={value}" for key, value in bad.items())
            raise NonFiniteLossError(
                f"{self.stage}: non-finite {values} at {steps}; training stopped and {kept}. Lower the learning rate "
                "(or set max_grad_norm), then rerun with resume=true to continue from the last good checkpoint, if any."
            )
        if "loss" in logs:
            self.last_checked_step = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            (self.output_dir / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)
