"""The stage lifecycle, written down once: every stage's `run` is one `with StageRun.open(...)` block.

    with StageRun.open(config, stage="sft") as run:      # setup: DeepSpeed file checked, seed, output directory claimed
        if run.already_done: return run.metrics          #   (resume=true of a stage registered ready)
        ... model and tokenizer, data, trainer ...        # a bad input raises here: nothing recorded
        run.begin(parent=base, tokenizer=tokenizer)       # W&B run + registry entry, `incomplete`
        ... train, save, evaluate: run.record(...) ...     # metrics reach the registry as they come
    # normal exit: checkpoints removed, metrics merged (never replaced), entry `ready`, W&B closed
    # an exception after begin(): entry `failed` (never NAME:latest; resume=true continues it;
    #   `rlhf registry gc` removes it when asked), W&B closed with exit code 1, the exception propagates
    # a kill -9 leaves the entry `incomplete`: nothing runs to say otherwise
    # from begin() (or a resume's take-over) to finish, the entry names this process as its owner and a
    # background heartbeat refreshes it: `rlhf registry gc` never removes it meanwhile, and if the entry is
    # removed or taken over anyway, the stage stops at its next step (`check_alive`) with EntryLostError

Also here: the config fields every stage shares (`StageConfig`, `LoraSection`) and the command line of
`python -m stages.X` (`parse_args`; its errors are handled by `core.errors.run_main`). Under the launcher every rank opens the run; rank 0
alone writes the manifest, the registry entry, W&B and the output's metrics.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from stages import model_card
from stages.core import checkpoints, distributed, models, ownership, tracking
from stages.core.checkpoints import SHARED_DATASET
from stages.core.config import ConfigError, load_config, to_dict, usage, wants_help
from stages.core.errors import UserError
from stages.core.files import atomic_write, write_json
from stages.core.registry import Entry, EntryLostError, Registry, rlhf_home
from stages.core.secrets import scrub
from stages.evaluation import EvalConfig

MANIFEST = "stage_config.json"


@dataclass
class LoraSection:
    """Optional LoRA adapters (peft)."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=8, metadata={"help": "Adapter rank; higher = more capacity and memory."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "Module names that get adapters."}
    )
    merge_on_save: bool = field(default=True, metadata={"help": "Save merged full weights (loadable without peft) instead of adapters."})
    merge_scale: float = field(
        default=1.0,
        metadata={"help": "Multiply the learnt update by this when merging (0.5: halfway between the start and the trained model, "
                  "WiSE-FT); needs merge_on_save."},
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.merge_scale <= 2.0:
            raise ValueError(f"lora.merge_scale must be in (0, 2], not {self.merge_scale}: it scales the learnt update when merging")
        if self.merge_scale != 1.0 and not self.merge_on_save:
            raise ValueError("lora.merge_scale needs lora.merge_on_save: true (the scale is applied when the adapters are merged)")

    def peft_config(self, task_type: str, modules_to_save: list[str] | None = None) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
            modules_to_save=modules_to_save,
        )


@dataclass
class StageConfig:
    """Fields every stage has."""

    model: str = field(default="tiny-llama", metadata={"help": "Model reference: registry name[:version], kind:latest, built-in name, or path."})
    run_name: str | None = field(default=None, metadata={"help": "Name of this run (default: STAGE-TIMESTAMP)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the output goes (default: RLHF_HOME/RUN_NAME/STAGE)."})
    register_as: str | None = field(default=None, metadata={"help": "Registry name of the output (default: the stage name)."})
    seed: int = field(default=42, metadata={"help": "Seed of data order, initialisation and sampling."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in output_dir from its last checkpoint."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model repositories' own Python code. Off unless you trust it."})
    check_model_kinds: bool = field(
        default=True,
        metadata={"help": "Refuse a model reference of the wrong kind for its role (an SFT model as reward model, a reward model as "
                          "policy; reward/kinds.py). false: only warn, for research that means it."},
    )
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config, e.g. deepspeed_configs/zero3.json (needs the deepspeed launcher)."})
    length_grouping: int = field(
        default=0,
        metadata={
            "help": "SFT/reward/DPO: sort each group of N batches by length, then shuffle all batches (less padding; "
            "0: random batches). See stages/data/batching.py."
        },
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA adapters."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation."})
    tracking: tracking.TrackingConfig = field(default_factory=tracking.TrackingConfig, metadata={"help": "W&B."})

    def __post_init__(self) -> None:
        if self.length_grouping < 0:
            raise ConfigError(f"length_grouping must be 0 (off) or a number of batches, not {self.length_grouping}")


class OutputDirError(UserError, RuntimeError):
    """The output directory holds another run; refusing to overwrite it."""


@dataclass
class StageRun:
    """What the lifecycle holds across a stage's sections; see the module docstring for the order."""

    stage: str
    kind: str
    config: StageConfig
    run_name: str
    output_dir: Path
    registry: Registry
    deepspeed_config: str | None = None  # the checked DeepSpeed file's absolute path (None: no DeepSpeed)
    entry: Entry | None = None
    wandb_run: Any = None
    started: float = field(default_factory=time.time)
    already_done: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)  # held-out and training metrics, merged at finish
    samples: list[dict[str, Any]] = field(default_factory=list)  # sample generations for the report and W&B
    card: dict[str, Any] = field(default_factory=dict)  # the model card's fields (base, data, config, steps, ...)
    owner: dict[str, Any] = field(default_factory=ownership.current_owner)  # this process, as the entry's owner
    heartbeat: ownership.Heartbeat | None = None  # main process, while it owns an entry that is not ready

    @classmethod
    @contextmanager
    def open(cls, config: StageConfig, stage: str, kind: str | None = None) -> Iterator[StageRun]:
        """Setup section (claim the output directory) on enter; finish or fail on exit."""
        run = cls._claim(config, stage, kind or stage)
        try:
            yield run
            if not run.already_done:
                run._finish()
        except Exception:  # the stage's, or a failed write of its metrics and card: either way not ready
            run._fail()
            raise

    # -- setup ---------------------------------------------------------------------------------
    @classmethod
    def _claim(cls, config: StageConfig, stage: str, kind: str) -> StageRun:
        """Name the run, claim the output directory (main process writes its manifest)."""
        from transformers import set_seed

        deepspeed_config = distributed.resolve_deepspeed_config(config.deepspeed)  # a bad file stops before anything is written
        distributed.setup()
        # Seed before any model is built: a new head (the reward model's score layer) is initialised from the
        # global generator, so without this an interrupted-and-resumed run would not match an uninterrupted one.
        set_seed(config.seed)
        run_name = config.run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        output_dir = Path(config.output_dir) if config.output_dir else rlhf_home() / run_name / stage
        run = cls(stage=stage, kind=kind, config=config, run_name=run_name, output_dir=output_dir.resolve(), registry=Registry(),
                  deepspeed_config=deepspeed_config)
        if distributed.is_main_process():
            run._claim_output_dir()
        run.already_done = distributed.broadcast_object(run.already_done)
        if run.already_done and run.entry is not None:
            run.metrics = dict(run.entry.metrics)
        return run

    def _claim_output_dir(self) -> None:
        manifest = self.output_dir / MANIFEST
        resolved = scrub(to_dict(self.config)) | {"run_name": self.run_name, "output_dir": str(self.output_dir), "stage": self.stage}
        # A directory holding only a manifest (and the dataset copy) is a run that failed before writing anything: reuse it.
        if self.output_dir.exists() and any(path.name not in (MANIFEST, SHARED_DATASET) for path in self.output_dir.iterdir()):
            ready = [e for e in self._entries_here() if e.status == "ready"]
            held_stage = json.loads(manifest.read_text()).get("stage", self.stage) if manifest.exists() else self.stage
            if self.config.resume and held_stage != self.stage:
                raise OutputDirError(
                    f"{self.output_dir} holds a {held_stage} run, not a {self.stage} run; resume=true cannot continue it. "
                    "Choose another output_dir/run_name. Nothing was overwritten."
                )
            if not self.config.resume:
                holder = json.loads(manifest.read_text()).get("run_name", "?") if manifest.exists() else "unknown files"
                raise OutputDirError(
                    f"{self.output_dir} already holds {'run ' + repr(holder) if manifest.exists() else holder}; "
                    "pass resume=true to continue it, or choose another output_dir/run_name. Nothing was overwritten."
                )
            if ready:
                self.already_done, self.entry = True, ready[-1]
                print(f"{self.stage}: {self.output_dir} is already registered ready as {ready[-1].ref}; nothing to do.")
                return
        unfinished = [e for e in self._entries_here() if e.status != "ready"]
        if self.config.resume and unfinished:  # refused while another process writes it (EntryBusyError)
            self._own(self.registry.take_over(unfinished[-1].ref))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(manifest, resolved)

    def _own(self, entry: Entry) -> None:
        """Hold `entry` as its owner: heartbeats from now until finish or fail."""
        self.entry = entry
        self.heartbeat = ownership.Heartbeat(lambda: self.registry.beat(entry.ref, self.owner))

    def _entries_here(self) -> list[Entry]:
        return [e for e in self.registry.list(include_builtin=False) if Path(e.path) == self.output_dir]

    # -- begin: after the inputs are checked, before training -------------------------------------
    def begin(self, parent: Entry | None, tokenizer: Any = None, **fields: Any) -> None:
        """Open W&B and record the output as incomplete, so a crash leaves a visible incomplete entry.
        With resume=true the entry of the interrupted (or failed) attempt is continued, not duplicated."""
        if not distributed.is_main_process():
            return
        config = self.config
        self.wandb_run = tracking.start_run(
            config.tracking, self.run_name, job_type=self.stage, config=scrub(to_dict(config)), run_dir=self.output_dir
        )
        if self.entry is not None:  # resume=true: the entry taken over when the output directory was claimed
            return
        if tokenizer is not None:
            fields |= {"tokenizer_hash": models.tokenizer_hash(tokenizer), "chat_template_hash": models.chat_template_hash(tokenizer)}
        if parent is not None:  # a base converted from a GGUF file: its sha256 (else the parent's own record of it)
            fields.setdefault("source_sha256", models.source_sha256(parent) or parent.source_sha256)
        entry = self.registry.begin(
            config.register_as or self.stage,
            self.kind,
            self.output_dir,
            parent=parent.ref if parent and not parent.builtin else (parent.name if parent else None),
            stage=self.stage,
            run=self.run_name,
            config=scrub(to_dict(config)),
            trust_remote_code=config.trust_remote_code,
            wandb_run=tracking.run_path(self.wandb_run),
            owner=self.owner,
            **fields,
        )
        self._own(entry)

    def beat(self) -> None:
        """Refresh the heartbeat now (after a checkpoint, a PPO step), then `check_alive`."""
        if self.heartbeat is not None:
            self.heartbeat.beat_now()
        self.check_alive()

    def check_alive(self) -> None:
        """Raise EntryLostError if this stage's entry was removed or taken over: called between training steps
        (TRL callback, our PPO's step hook) and on every record, so the stage stops before training further."""
        if self.heartbeat is not None:
            self.heartbeat.check()

    def record(self, **metrics: Any) -> None:
        """Add metrics now: kept in the registry entry at once (main process) and merged into the final ones."""
        self.metrics |= metrics
        if distributed.is_main_process() and self.entry is not None:
            self.check_alive()
            stored = self.registry.get(self.entry.ref).metrics
            self.entry = self.registry.update(self.entry.ref, owner=self.owner, metrics=stored | metrics, heartbeat=time.time())

    # -- finish or fail ----------------------------------------------------------------------------
    def _finish(self) -> None:
        """Register section: drop checkpoints, write metrics, samples and the model card, flip the entry to
        ready (metrics merged with what it already holds), close W&B."""
        self.check_alive()
        checkpoints.remove_checkpoints(self.output_dir)
        if not distributed.is_main_process():
            return
        stored = self.registry.get(self.entry.ref).metrics if self.entry is not None else {}
        metrics = stored | self.metrics | {"seconds": round(time.time() - self.started, 1)}
        write_json(self.output_dir / "metrics.json", scrub(metrics))
        write_json(self.output_dir / "samples.json", scrub(self.samples))
        self._write_model_card(metrics)
        tracking.log(self.wandb_run, metrics)
        tracking.log_table(self.wandb_run, "eval/samples", self.samples)
        if self.entry is not None:
            self._stop_heartbeat()
            self.entry = self.registry.update(
                self.entry.ref, owner=self.owner, status="ready", metrics=metrics, wandb_run=tracking.run_path(self.wandb_run)
            )
        tracking.finish(self.wandb_run, metrics)
        self._print_summary(metrics)

    def _fail(self) -> None:
        """The stage raised after begin(): the entry says so (it is never resolved as a model) and W&B closes."""
        if not distributed.is_main_process() or self.already_done:
            return
        lost = self.heartbeat is not None and self.heartbeat.error is not None
        self._stop_heartbeat()
        if self.entry is not None and self.entry.status != "ready" and not lost:
            try:
                self.entry = self.registry.update(self.entry.ref, owner=self.owner, status="failed")
            except EntryLostError:
                pass  # removed or taken over: nothing of this process's to mark
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def _write_model_card(self, metrics: dict[str, Any]) -> None:
        card, ref = self.card, self.entry.ref if self.entry else "(not registered)"
        auto_class = card.get("auto_class", "AutoModelForCausalLM")
        lines = [
            f"# {ref}",
            "",
            f"Stage `{self.stage}` of rlhf-stages, run `{self.run_name}`.",
            "",
            f"- base model: `{card.get('base', '?')}`",
            f"- data: {card.get('data', '?')}",
            *[f"- {key}: `{value}`" for key, value in card.get("config", {}).items()],
            "",
            "## Held-out metrics",
            "",
            *model_card.metrics_table(metrics),
            "",
            "## Load it",
            "",
            *(self._dataset_usage(ref) if card.get("dataset") else [
                "```python",
                f"from transformers import {auto_class}, AutoTokenizer",
                f"model = {auto_class}.from_pretrained('{self.output_dir}')",
                f"tokenizer = AutoTokenizer.from_pretrained('{self.output_dir}')",
                "```",
                f"or in any stage config: `model: {ref}`.",
            ]),
            "",
            *([card["note"], ""] if card.get("note") else []),
        ]
        atomic_write(self.output_dir / "README.md", "\n".join(lines))

    def _dataset_usage(self, ref: str) -> list[str]:
        return [
            "In a stage config: `datasets: [{source: " + ref + ", split: rows}]` (SFT) or `split: pairs` (DPO, reward model); "
            f"or `datasets.load_dataset('json', data_files='{self.output_dir}/rows.jsonl')`.",
        ]

    def _print_summary(self, metrics: dict[str, Any]) -> None:
        rows = [
            ("model", self.card.get("base", "?")),
            ("stage", self.stage),
            ("steps", self.card.get("steps", "?")),
            ("seconds", f"{metrics.get('seconds', 0):.1f}"),
            *[(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in metrics.items()
              if key.startswith(("train/", "eval/", "samples/")) and key.count("/") == 1],
            ("output", str(self.output_dir)),
            ("registry", self.entry.ref if self.entry else "-"),
        ]
        width = max(len(key) for key, _ in rows)
        print("\n" + "\n".join(f"  {key:<{width}}  {value}" for key, value in rows) + "\n", flush=True)


def base_name(entry: Entry) -> str:
    """How a model card and the registry name the model a stage started from."""
    return entry.ref if not entry.builtin else entry.name


# -- entry point ---------------------------------------------------------------------------------

def parse_args(config_class: type, argv: list[str] | None) -> tuple[Any, bool]:
    """Parse a stage's command line; `--check` validates the config (and its DeepSpeed file) and stops."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        module = config_class.__module__  # stages.sft, stages.reward_model, stages.policy
        command = f"python -m {module} --config FILE.yaml [key=value ...] [--check]   (also: rlhf {module.split('.')[-1].split('_')[0]} ...)"
        print(usage(config_class, command))
        sys.exit(0)
    check_only = "--check" in argv
    config = load_config(config_class, [argument for argument in argv if argument != "--check"])
    if check_only:
        distributed.resolve_deepspeed_config(config.deepspeed)
        print(f"{config_class.__name__}: ok")
    return config, check_only
