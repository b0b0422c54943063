"""Turn a registry entry into a tokenizer and a model, safely.

Weights load from safetensors only (a pickle checkpoint is refused: unpickling runs code), and
`trust_remote_code` stays off unless the config asks for it or the registry entry recorded it.
Built-in base models are built from their config with a seeded random initialisation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError

from stages.core.errors import UserError
from stages.core.registry import Entry

PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "training_args.bin")


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer cannot be loaded; the message names it and says why."""


def load_tokenizer(entry: Entry, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    check_ready(entry)
    source = str(model_dir(entry) or _builtin_tokenizer_dir(entry) or entry.path)
    if not entry.builtin and (Path(source) / "config.json").is_file():
        check_files_intact(Path(source), entry.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code or entry.trust_remote_code)
    except ValueError as error:
        raise ModelLoadError(_explain(entry, error)) from None
    except OSError as error:
        raise ModelLoadError(f"cannot load the tokenizer of {entry.name!r} from {source}: {error}") from None
    except Exception as error:  # the tokenizers library raises a bare Exception for a damaged tokenizer.json
        raise ModelLoadError(
            f"cannot load the tokenizer of {entry.name!r} from {source}: its files are damaged ({type(error).__name__}: {error}); "
            "re-run the stage that wrote it"
        ) from None
    if tokenizer.pad_token is None:
        # Causal LMs often ship without one; padding with EOS is standard and masked everywhere.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(entry: Entry, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    check_ready(entry)
    if entry.builtin and model_dir(entry) is None:
        spec = builtin_spec(entry)
        config = _builtin_config(spec)
        with _seeded(spec.get("seed", 0)):
            return AutoModelForCausalLM.from_config(config)
    return _from_pretrained(AutoModelForCausalLM, entry, trust_remote_code, dtype)


def load_sequence_classifier(entry: Entry, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> Any:
    """A scalar head (num_labels=1) on the entry's backbone: reward models and critics."""
    from transformers import AutoModelForSequenceClassification

    check_ready(entry)
    if entry.builtin and model_dir(entry) is None:
        spec = builtin_spec(entry)
        config = _builtin_config(spec, num_labels=1)
        with _seeded(spec.get("seed", 0)):
            return AutoModelForSequenceClassification.from_config(config)
    return _from_pretrained(AutoModelForSequenceClassification, entry, trust_remote_code, dtype, new_head=True, num_labels=1)


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with equal hashes encode alike."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(map(str, tokenizer.all_special_tokens))}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def chat_template_hash(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def check_ready(entry: Entry) -> None:
    """Refuse an entry whose stage never finished or failed (asked for by explicit version): its files may be half-written."""
    if entry.status != "ready":
        why = "failed before it finished" if entry.status == "failed" else "never finished"
        raise ModelLoadError(
            f"{entry.ref} is {entry.status}: the stage writing {entry.path} {why}, so its files may be half-written. "
            f"Resume that run (resume=true, same run_name/output_dir), or use a ready version ({entry.name}:latest)."
        )


def check_safetensors_only(path: str | Path, name: str) -> None:
    """Refuse a local checkpoint that only has pickle weights."""
    path = Path(path)
    if not path.is_dir():
        return
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    pickles = [file for file in PICKLE_WEIGHT_FILES if (path / file).exists() and file != "training_args.bin"]
    if pickles and not has_safetensors:
        raise ModelLoadError(
            f"{name} at {path} has only pickle weights ({', '.join(pickles)}); rlhf-stages loads safetensors only, "
            "because unpickling can run arbitrary code. Convert it once you trust it: "
            "`AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)`."
        )


def model_dir(entry: Entry) -> Path | None:
    """The safetensors directory a GGUF-backed entry loads from (a built-in whose spec names a packaged GGUF
    file, or a `.gguf` path): converted once (stages/core/gguf.py). None for every other entry."""
    from stages.core import gguf
    from stages.core.registry import rlhf_home

    if entry.builtin:
        source = builtin_spec(entry).get("gguf")
        return gguf.converted(gguf.packaged_file(source["package"], source["file"]), rlhf_home()) if source else None
    if str(entry.path).endswith(".gguf"):
        return gguf.converted(Path(entry.path), rlhf_home())
    return None


def source_sha256(entry: Entry) -> str | None:
    """The sha256 of the GGUF file a GGUF-backed entry was converted from (None for other entries)."""
    from stages.core import gguf

    directory = model_dir(entry)
    return gguf.source_sha256(directory) if directory is not None else None


def _builtin_tokenizer_dir(entry: Entry) -> Path | None:
    # A config-only built-in names its tokenizer folder relative to the spec file (both ship in the package).
    return Path(entry.path).parent / builtin_spec(entry)["tokenizer"] if entry.builtin else None


def _from_pretrained(
    auto_class: Any, entry: Entry, trust_remote_code: bool, dtype: torch.dtype | None, new_head: bool = False, **kwargs: Any
) -> Any:
    """`auto_class.from_pretrained` of the entry's directory, refusing a model any of whose weights the files lack
    (transformers would initialise them at random and only log it), except, with `new_head`, the weights outside the
    backbone: a reward model's or critic's fresh scalar head on an SFT model."""
    path = str(model_dir(entry) or entry.path)
    check_safetensors_only(path, entry.name)
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        raise ModelLoadError(f"{entry.name} at {path} is not a model directory (no config.json)")
    check_files_intact(Path(path), entry.name)
    try:
        model, info = auto_class.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code or entry.trust_remote_code,
            dtype=dtype,
            output_loading_info=True,
            **kwargs,
        )
    except ValueError as error:
        raise ModelLoadError(_explain(entry, error)) from None
    except OSError as error:
        raise ModelLoadError(f"cannot load model {entry.name!r} from {path}: {error}") from None
    except SafetensorError as error:  # intact sizes, unreadable content
        raise ModelLoadError(f"the model directory {path} ({entry.name}) is damaged: {error}; re-run the stage that wrote it") from None
    backbone = f"{model.base_model_prefix}."
    missing = sorted(key for key in info.get("missing_keys", ()) if not new_head or key.startswith(backbone))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"model {entry.name!r} at {path}: its files lack {len(missing)} weight(s) of {type(model).__name__} ({shown}), "
            "which would start at random; was it saved with the weights under other names (e.g. only one of two tied "
            "tensors)? Re-save it with save_pretrained"
        )
    return model


def check_files_intact(path: Path, name: str) -> None:
    """Refuse a model directory whose config.json does not parse or whose safetensors files are cut short or
    padded (a copy or a save interrupted mid-write): each file's 8-byte header length, JSON header and tensor
    offsets must account for its size exactly. Reads headers only."""
    if not path.is_dir():
        return
    damaged = f"the model directory {path} ({name}) is damaged"
    redo = "re-run the stage that wrote it (resume=true continues from its last complete checkpoint), or copy it again"
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{damaged}: {path / 'config.json'} is not valid JSON ({error}); {redo}") from None
    for file in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            raise ModelLoadError(f"{damaged}: weights file {file} {problem}; {redo}")


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"is truncated ({size} bytes)"
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            return f"is truncated: its header says {length} header bytes, the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has an unreadable header"
    ends = [tensor["data_offsets"][1] for key, tensor in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"is {'truncated' if size < expected else 'longer than its header says'}: {size} bytes, expected {expected}"
    return None


def _explain(entry: Entry, error: Exception) -> str:
    message = str(error)
    if "trust_remote_code" in message:
        return (
            f"model {entry.name!r} needs custom code from its repository (trust_remote_code), which is off by default. "
            "If you trust that code, set `trust_remote_code: true` in the stage config."
        )
    return f"cannot load {entry.name!r} from {entry.path}: {message}"


def builtin_spec(entry: Entry) -> dict[str, Any]:
    """A built-in entry's spec file (resources/models/NAME.yaml): config or GGUF source, tokenizer, hub_id, license."""
    return yaml.safe_load(Path(entry.path).read_text())


def _builtin_config(spec: dict[str, Any], **overrides: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**(spec["config"] | overrides))


class _seeded:
    """Seed the global RNG for a model's init, then restore it, so building a model doesn't shift data order."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        torch.random.set_rng_state(self.state)
