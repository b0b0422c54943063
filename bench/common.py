"""What every arm shares: the two benchmark models, the data, and the measurements.

Imported by arms running under both virtual environments (ours, and bench/.venv-trl111 for TRL 1.11's
PPO), so importing it loads only torch, transformers, datasets and yaml; `trainer_class`, `sft_trainer_class`,
`pair_trainer_class`, `BackbonePositions` and TokenCounter's padding-free count import `stages.data` modules when they
are called, which only our arms do.
"""

from __future__ import annotations

import json
import random
import resource
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "stages" / "core" / "resources" / "tiny_tokenizer"
RESULT_MARKER = "BENCH_RESULT "

# Two sizes built from stages/core/resources/models/tiny-llama.yaml (same family: wide and shallow, tied embeddings, the
# byte-level tokenizer), fp32, random init. Only the shape keys change.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},  # the repo's default as it is (1.4 M)
    # The PPO speed anchor of the project's first measurements (TRL 1.11's PPO at ~70 episodes/s on a 0.67 M
    # model, hidden 128, 4 layers), with our 261-token vocabulary.
    "0.67m": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4},
    "5m": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 6,
           "num_key_value_heads": 6},
    "20m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 8},
}
MAX_LENGTH = 128  # tokens; every generated example fits, so no arm drops or truncates anything


def stage_settings(config: str, section: str, drop: set[str]) -> dict[str, Any]:
    """A stage config's TRL section (minus `drop`), plus the stage keys that change how TRL trains: what
    stages.trainers.trl_args adds, and `length_grouping` (our batch sampler; see `trainer_class`)."""
    loaded = yaml.safe_load((ROOT / "configs" / config).read_text())
    settings = {key: value for key, value in loaded[section].items() if key not in drop}
    return {"logging_nan_inf_filter": False, "length_grouping": loaded.get("length_grouping", 0)} | settings


def trainer_class(trl_class: type, settings: dict[str, Any]) -> type:
    """The trainer an arm runs: pops `length_grouping` (not a TRL argument) and applies it as the stage does."""
    from stages.data.batching import length_grouped

    return length_grouped(trl_class, settings.pop("length_grouping", 0))


def sft_trainer_class(settings: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The SFT trainer an arm runs and its SFTConfig arguments, as stages/sft.py builds them: `trainer_class`, padding-free
    batches in rows (stages/data/sft_packing.py; `padding_free_rows: False` keeps TRL's own one row) and max_length None
    under padding_free without packing."""
    from trl import SFTTrainer

    from stages.data import sft_packing

    rows = settings.pop("padding_free_rows", True) and settings.get("padding_free")
    trainer = trainer_class(SFTTrainer, settings)
    return (sft_packing.padding_free_rows(trainer) if rows else trainer), sft_packing.trl_section(settings)


def pair_trainer_class(trl_class: type, settings: dict[str, Any]) -> type:
    """The reward or DPO trainer an arm runs: `trainer_class`, and pops `padding_free` (ours, not TRL's: the stages'
    top-level key, stages/data/packing.py) and applies it as the reward and policy stages do."""
    from stages.data.packing import padding_free

    return padding_free(trainer_class(trl_class, settings), settings.pop("padding_free", False))


class BackbonePositions:
    """Positions the model's backbone embeds in training forwards: the padded batch's, or with padding_free the
    packed rows' (their filler included). TokenCounter sees the collated batch, padded either way."""

    def __init__(self, model: torch.nn.Module) -> None:
        from stages.data.packing import backbone_of

        self.positions = 0
        self.handle = backbone_of(model).get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple) -> None:
        if torch.is_grad_enabled():  # the reference's and the first-batch check's forwards run without gradients
            self.positions += args[0].numel()


def model_config(size: str, **extra: Any) -> Any:
    from transformers import AutoConfig

    config = yaml.safe_load((ROOT / "stages" / "core" / "resources" / "models" / "tiny-llama.yaml").read_text())["config"]
    config.update(MODEL_SHAPES[size])
    return AutoConfig.for_model(**config, **extra)


def causal_lm(size: str, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(size))


def classifier(size: str, seed: int = 0) -> Any:
    """A sequence-classification model with one output: reward model or critic."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(model_config(size, num_labels=1))


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (tied LM head counted once, as the embedding)."""
    total = sum(parameter.numel() for parameter in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


# ---------------------------------------------------------------------------------------------------------
# Data: deterministic, generated here, identical for every arm of a comparison
# ---------------------------------------------------------------------------------------------------------
def _letters(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def _payload_length(rng: random.Random, kind: str) -> int:
    # "variable": skewed like chat data (many short, a few long): 16 to 122 tokens a conversation, mean ~50.
    # "uniform": every conversation exactly 60 tokens, so padding can only come from the arm itself.
    return 3 + int(54 * rng.random() ** 2) if kind == "variable" else 25


def sft_rows(kind: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows (what stages/sft.py feeds SFTTrainer): copy a random string."""
    rng = random.Random(f"sft-{kind}-{seed}")
    rows = []
    for _ in range(count):
        text = _letters(rng, _payload_length(rng, kind))
        rows.append({"prompt": [{"role": "user", "content": f"copy: {text}"}],
                     "completion": [{"role": "assistant", "content": text}]})
    return rows


def alpaca_file_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The "variable" rows written as a user's Alpaca-format file and read back through the stages' own loader
    (stages.data: file reading, format detection, conversion), as the SFT stage reads a user's data."""
    import json
    import tempfile

    from stages import data

    rows = [{"instruction": "copy", "input": row["completion"][0]["content"], "output": row["completion"][0]["content"]}
            for row in sft_rows("variable", count, seed)]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "user.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return data.load_sft_rows(data.DatasetSpec(source=str(path), eval_fraction=0), seed=seed)


def preference_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversational prompt/chosen/rejected rows: the copy is chosen, a corrupted copy rejected."""
    rng = random.Random(f"pairs-{seed}")
    rows = []
    for _ in range(count):
        text = _letters(rng, _payload_length(rng, "variable"))
        position = rng.randrange(len(text))
        wrong = text[:position] + chr((ord(text[position]) - 97 + 1) % 26 + 97) + text[position + 1 :]
        rows.append({"prompt": [{"role": "user", "content": f"copy: {text}"}],
                     "chosen": [{"role": "assistant", "content": text}],
                     "rejected": [{"role": "assistant", "content": wrong}]})
    return rows


def prompts(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat prompts for the on-policy arms (PPO, GRPO, RLOO): short instructions, 12 to 18 tokens templated."""
    rng = random.Random(f"prompts-{seed}")
    return [[{"role": "user", "content": f"copy: {_letters(rng, rng.randint(3, 9))}"}] for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------
class TokenCounter:
    """Counts what reaches the model's top-level forward during training: rows, positions (the tensor's size,
    padding included) and real tokens (attention_mask ones; padding-free batches have no padding). A
    gradient-checkpointing recompute runs inside the layers, so it is not counted twice. `sequence_lengths`
    keeps each real sequence's length, for the attention term of the FLOP count."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forwards = self.sequences = self.positions = self.real_tokens = 0
        self.squared_lengths = 0  # sum over sequences of length**2 (attention FLOPs)
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():  # evaluation / reference forwards are not training tokens
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        attention_mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        self.forwards += 1
        self.positions += input_ids.numel()
        if attention_mask is not None and attention_mask.dim() == 2:
            lengths = attention_mask.sum(dim=1)
        elif position_ids is not None:  # padding-free: a new sequence wherever position 0 starts; rows' filler left out
            from stages.data.sft_packing import filler_mask

            position_ids = position_ids.expand_as(input_ids)
            real = ~filler_mask(input_ids, position_ids, getattr(module.config, "pad_token_id", None))
            flat = position_ids[real]  # every row's real tokens, in order: each sequence starts at 0
            starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
            lengths = torch.tensor([end - start for start, end in zip(starts, starts[1:])])
        else:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1])
        self.sequences += len(lengths)
        self.real_tokens += int(lengths.sum())
        self.squared_lengths += int((lengths.long() ** 2).sum())

    def summary(self) -> dict[str, int]:
        return {"forwards": self.forwards, "sequences": self.sequences, "positions": self.positions, "real_tokens": self.real_tokens,
                "squared_lengths": self.squared_lengths}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def emit(result: dict[str, Any]) -> None:
    """The one line the parent reads back: the arm's result as JSON, peak RSS added."""
    result = dict(result, peak_rss_mb=round(peak_rss_mb(), 1), threads=torch.get_num_threads())
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


class Timer:
    """Wall-clock seconds and this process's CPU seconds (user + system, all its threads). On a shared machine
    the wall clock includes time spent waiting for a core; the CPU seconds do not, so they are the steadier
    measure of the work an arm needs, and the wall clock the one a user waits for."""

    def __enter__(self) -> "Timer":
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started
