"""Stage 1: instruction SFT on trl.SFTTrainer.

What it implements: supervised fine-tuning on prompt/completion pairs with the loss on completion
tokens only (TRL's completion mask), the model's chat template applied identically in training and
in generation, optional LoRA (merged on save by default), optional packing, padding-free batches
(`train.padding_free`: rows as wide as the longest sequence, stages/data/sft_packing.py), and DeepSpeed ZeRO-2/3
from `deepspeed_configs/`. Departures: multi-turn conversations train on their final assistant turn
only (see stages/data/formats.py); examples longer than `train.max_length` are dropped, not truncated, since
a truncated answer teaches the model to stop mid-answer (the count is printed).

Run:
    rlhf sft --config configs/sft/tiny.yaml [key=value ...]
    python -m stages.sft --config configs/sft/tiny.yaml
    deepspeed --num_gpus 2 --module stages.sft --config configs/sft/tiny.yaml deepspeed=deepspeed_configs/zero3.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reward import kinds
from stages import data, evaluation, heldout, trainers
from stages.core import distributed, models
from stages.core.config import ConfigError
from stages.core.registry import Registry
from stages.data import batching, mixture
from stages.core.errors import run_main
from stages.lifecycle import StageConfig, StageRun, base_name, parse_args


@dataclass
class SFTStageConfig(StageConfig):
    """Config of the SFT stage (configs/sft/*.yaml)."""

    datasets: list[data.DatasetSpec] = field(
        default_factory=lambda: [data.DatasetSpec()],
        metadata={"help": "Training datasets: the sources of the mixture (formats: stages/data/formats.py; weights: stages/data/mixture.py)."},
    )
    mixture_size: int | None = field(
        default=None, metadata={"help": "Total training examples; sources with a weight share what fixed num_examples leave."}
    )
    train: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "trl.SFTConfig arguments (checked against its fields). padding_free: true trains without padding, in rows as "
                "wide as the longest sequence (stages/data/sft_packing.py); same loss as padded."})

    def __post_init__(self) -> None:
        from trl import SFTConfig

        super().__post_init__()
        self.train = trainers.check_trl_section(SFTConfig, self.train, "train", "sft config")
        if not self.datasets:
            raise ConfigError("datasets must list at least one dataset")
        mixture.check(self.datasets, self.mixture_size, self.eval.heldout_tasks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, check_only = parse_args(SFTStageConfig, argv)
    return {} if check_only else run(config)


def run(config: SFTStageConfig) -> dict[str, Any]:
    # -- setup ---------------------------------------------------------------------------------
    with StageRun.open(config, stage="sft") as stage:
        if stage.already_done:
            return stage.metrics

        # -- model and tokenizer ---------------------------------------------------------------
        base = Registry().get(config.model)
        kinds.require(base, "policy", "model", "sft", config.check_model_kinds)
        tokenizer = models.load_tokenizer(base, config.trust_remote_code)
        if tokenizer.chat_template is None:
            raise ConfigError(f"model {config.model!r} has no chat template; SFT on chat data needs one (set it in the tokenizer)")
        model = models.load_causal_lm(base, config.trust_remote_code)

        # -- data ------------------------------------------------------------------------------
        rows = mixture.mix(
            config.datasets,
            config.mixture_size,
            config.seed,
            lambda spec, index, count: data.load_sft_rows(spec, config.seed + index, count, config.eval.heldout_tasks),
        )
        rows, token_counts = _drop_too_long(rows, tokenizer, config.train.get("max_length", 1024))
        mixture_metrics = mixture.report(rows, token_counts, mixture.requested_shares(config.datasets, config.mixture_size))
        print("sft: training mixture\n" + mixture.describe(mixture_metrics))
        train_dataset = trainers.shared_dataset(stage, _to_dataset(rows))
        dataset_fingerprint = data.fingerprint(rows)
        # Held-out rows of the user's sources (never in `rows`); the embedded tasks hold out their own instances.
        user_heldout = [row for spec in config.datasets if spec.source != "embedded" for row in data.load_sft_heldout(spec)]
        embedded = config.eval.scores_embedded(config.datasets)

        # -- trainer ---------------------------------------------------------------------------
        from trl import SFTConfig, SFTTrainer

        from stages.data import sft_packing  # imports TRL

        # train.padding_free: each batch without padding, in rows as wide as its longest sequence (stages/data/
        # sft_packing.py); TRL gets max_length None then: every row longer than it is already gone (_drop_too_long).
        trainer_class = sft_packing.padding_free_rows(batching.length_grouped(SFTTrainer, config.length_grouping))
        trainer = trainer_class(
            model=model,
            args=trainers.trl_args(SFTConfig, stage, config, sft_packing.trl_section(config.train)),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
        )
        stage.begin(parent=base, tokenizer=tokenizer, dataset_fingerprint=dataset_fingerprint)

        # -- train -----------------------------------------------------------------------------
        result = trainers.train(trainer, stage, config)

        # -- save ------------------------------------------------------------------------------
        trainers.save_output(stage, lambda: trainer.save_model(str(stage.output_dir)))
        trainers.settle_after_save(stage, config, base, merge_lora=config.lora.merge_on_save)

        # -- evaluate (on the saved model: what the next stage will load; every rank a share) -----
        stage.record(**{"train/loss": float(result.training_loss), "train/examples": len(rows)}, **mixture_metrics)
        if config.eval.enabled:
            adapters_only = config.lora.enabled and not config.lora.merge_on_save  # no full model on disk to reload
            saved = None if adapters_only else Registry().get(str(stage.output_dir))
            trained = trainer.model if saved is None else models.load_causal_lm(saved).to(distributed.device())
            trained_tokenizer = tokenizer if saved is None else models.load_tokenizer(saved)
            # The starting model is scored too (eval/ref_*): what instruction tuning changed, on the same prompts.
            start = models.load_causal_lm(base, config.trust_remote_code).to(distributed.device())
            if embedded:  # the embedded tasks' metrics only where the stage trained on them
                eval_metrics, stage.samples = evaluation.exact_match_from_start(trained, start, trained_tokenizer, config.eval)
                stage.record(**eval_metrics)
            if user_heldout:
                data_metrics, data_samples = heldout.sft_metrics(
                    trained, start, trained_tokenizer, user_heldout[: config.eval.num_prompts], config.eval.max_new_tokens,
                    config.eval.batch_size, prefix="eval/data/" if embedded else "eval/",
                )
                stage.record(**data_metrics)
                stage.samples = stage.samples or data_samples
            if config.eval.benchmarks:  # IFBench / IFEval-format files, trained and start (eval/ref_NAME/...); last: may cast dtype
                stage.record(**evaluation.benchmark_metrics(trained, start, trained_tokenizer, config.eval, stage.output_dir))

        # -- register (on leaving the block: checkpoints removed, metrics merged, entry ready) ------
        stage.card = {
            "base": base_name(base),
            "data": ", ".join(spec.source for spec in config.datasets) + f" ({len(rows)} examples, fingerprint {dataset_fingerprint})",
            "config": {k: config.train.get(k) for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_length")},
            "steps": trainer.state.global_step,
        }
    return stage.metrics


def _drop_too_long(rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows that fit `max_length`, and their token counts (for the mixture report)."""
    lengths = data.token_counts(tokenizer, rows)
    kept = [(row, length) for row, length in zip(rows, lengths) if max_length is None or length <= max_length]
    dropped = len(rows) - len(kept)
    if not kept:
        raise data.DataError(f"all {len(rows)} examples are longer than train.max_length={max_length} tokens; raise max_length")
    if dropped:
        print(f"sft: dropped {dropped} of {len(rows)} examples longer than train.max_length={max_length} tokens")
    return [row for row, _ in kept], [length for _, length in kept]


def _to_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    has_text = {"text" in row for row in rows}
    if len(has_text) > 1:
        raise data.DataError("datasets mix plain `text` rows with conversations; train them in separate runs")
    columns = ["text"] if has_text == {True} else ["prompt", "completion"]
    return Dataset.from_list([{column: row[column] for column in columns} for row in rows])


if __name__ == "__main__":
    run_main(main)
