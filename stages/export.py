"""`rlhf export`: a registered model as a folder anyone can load with plain transformers or push to the Hub.

    rlhf export REF OUT [--overwrite] [--push-to-hub ORG/NAME [--private]]

The folder holds merged weights as safetensors (a stage output of LoRA adapters only is merged into its
parent here; tied embeddings stay tied), the tokenizer with its chat template, a generation_config.json whose
eos is the end-of-turn token (the special token the chat template closes an assistant turn with, then the
model's own eos list), and README.md: a model card with Hub front matter and a body generated from the registry
(stages/model_card.py). Nothing else is needed to load it:

    AutoModelForCausalLM.from_pretrained(OUT); AutoTokenizer.from_pretrained(OUT)

Written whole or not at all: into a temporary folder `.OUT.export-PID` beside OUT, renamed onto OUT at the end (a
failure removes it; one a killed export left behind is removed by the next export to the same OUT once its process
is gone). An OUT that exists and is not empty is refused unless --overwrite; then the old folder is moved aside and
deleted only after the new one is in place. Refused before anything is touched, --overwrite or not: an OUT that is,
holds or lies inside a registered model's folder (the one exported, its lineage, any registry entry), that is or
holds RLHF_HOME (the registry and every run), or that holds the working folder. REF may be a registered output's
folder: its registry entry is exported, lineage and licence included. --push-to-hub uploads the finished folder
with huggingface_hub; credentials are checked before anything is written.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

from stages import generation, model_card
from stages.core import models, ownership
from stages.core.errors import UserError
from stages.core.registry import Entry, Registry

EXPORTABLE_KINDS = ("base", "sft", "policy")  # causal LMs; a reward model has a score head, not a chat model


class ExportError(UserError, RuntimeError):
    """The model cannot be exported to that folder (or pushed); the message names the reference or path."""


def export(ref: str, out: str | Path, overwrite: bool = False, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Write `ref` as a self-contained model folder at `out` (see the module docstring); returns its path."""
    registry = Registry()
    entry = registry.get(ref)  # an unknown reference: RegistryError, naming it
    if entry.version == 0 and not entry.builtin:  # a path: the registered output living there, lineage and all
        entry = registry.by_path(entry.path) or entry
    if entry.kind not in EXPORTABLE_KINDS:
        raise ExportError(
            f"{entry.ref} is a {entry.kind} entry; `rlhf export` writes causal language models ({', '.join(EXPORTABLE_KINDS)})"
        )
    out = Path(out).expanduser().resolve()
    _check_not_precious(out, entry, registry)
    _check_target(out, overwrite)
    if push_to_hub:
        hub_token(push_to_hub)  # before the export's minutes: no credentials, no work
    _remove_stale_temporaries(out)
    temporary = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        temporary.mkdir()
    except OSError as error:
        raise ExportError(f"cannot write the export {out.name} into the folder {out.parent}: {error.strerror or error}") from None
    try:
        _write(entry, registry, temporary)
        _move_into_place(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if push_to_hub:
        push(out, push_to_hub, private)
    return out


# -- the folder ------------------------------------------------------------------------------------

def _write(entry: Entry, registry: Registry, folder: Path) -> None:
    model, tokenizer = load(entry, registry)
    if tokenizer.chat_template is None:
        raise ExportError(f"{entry.ref} has no chat template; an exported chat model needs one (set it in the tokenizer)")
    model.generation_config = _generation_config(model, tokenizer, entry.ref)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card.render(entry, registry, model_card.files_of(folder)), encoding="utf-8")


def load(entry: Entry, registry: Registry) -> tuple[Any, Any]:
    """The entry's model with any LoRA adapters merged into its parent's weights, and its tokenizer."""
    models.check_ready(entry)
    path = Path(entry.path)
    adapters_only = (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    if not adapters_only:
        return models.load_causal_lm(entry), models.load_tokenizer(entry)
    from peft import PeftModel

    if entry.parent is None:
        raise ExportError(f"{entry.ref} at {path} holds LoRA adapters only and records no parent model to merge them into")
    parent = model_card.resolve(entry.parent, registry)
    if parent is None:
        raise ExportError(f"{entry.ref} holds LoRA adapters only; its parent {entry.parent!r} is no longer in the registry")
    merged = PeftModel.from_pretrained(models.load_causal_lm(parent), str(path)).merge_and_unload()
    return merged, models.load_tokenizer(entry if (path / "tokenizer_config.json").is_file() else parent)


def _generation_config(model: Any, tokenizer: Any, ref: str) -> Any:
    """The model's generation config with eos = the end-of-turn token first (then the other stop tokens), so a
    plain `model.generate` stops where the chat template ends a turn; pad = the tokenizer's pad."""
    from transformers import GenerationConfig

    config = model.generation_config if model.generation_config is not None else GenerationConfig.from_model_config(model.config)
    config = GenerationConfig.from_dict(config.to_dict())  # a copy: the loaded model's own config stays as it was
    stops = generation.stop_ids(model, tokenizer)  # the tokenizer's eos and the model's own are among them
    if not stops:
        raise ExportError(
            f"{ref} has no token that ends an answer (no end-of-turn token in its chat template, no eos in its tokenizer "
            "or generation config): a plain `generate` would never stop; set the tokenizer's eos_token and register it again"
        )
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    config.pad_token_id = tokenizer.pad_token_id
    config._from_model_config = False  # written on purpose: transformers must not re-derive it from config.json
    return config


# -- writing whole or not at all ---------------------------------------------------------------------

def _check_not_precious(out: Path, entry: Entry, registry: Registry) -> None:
    """Refuse an OUT whose writing or replacing would destroy or alter what the project keeps (see the module
    docstring), whatever --overwrite says: checked before anything is touched."""
    chain = model_card.lineage(entry, registry)[0]
    for kept in chain + registry.list(include_builtin=False):
        path = Path(kept.path).expanduser().resolve()
        if not path.exists():
            continue  # a Hub id, or an entry whose folder is gone
        what = f"the {'registered ' if kept.version else ''}model {kept.name if kept.builtin else kept.ref} ({path})"
        if out == path or out in path.parents:
            raise ExportError(
                f"refusing to export to {out}: it {'is' if out == path else 'holds'} {what}, which writing there would destroy; "
                "choose another folder"
            )
        if path in out.parents:
            raise ExportError(f"refusing to export to {out}: it lies inside {what}, which writing there would alter; choose a folder outside it")
    home = registry.home
    if out == home or out in home.parents:
        raise ExportError(
            f"refusing to export to {out}: it {'is' if out == home else 'holds'} RLHF_HOME ({home}: the registry {registry.path.name} "
            "and every run), which writing there would destroy; choose another folder"
        )
    working = Path.cwd().resolve()
    if out in working.parents or (out == working and any(out.iterdir())):
        raise ExportError(
            f"refusing to export to {out}: it {'is' if out == working else 'holds'} the working folder {working}, which writing there "
            "would destroy; choose another folder"
        )


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"export target {out} is a file, not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"export target {out} exists and is not empty; pass --overwrite to replace it, or choose another path")
    if not out.parent.is_dir():
        raise ExportError(f"the folder {out.parent} (where {out.name} would go) does not exist")


def _remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary folders `.OUT.export-PID` that exports killed before the end left beside OUT; never
    one whose process still runs (another export to the same OUT at this moment) or that cannot be told dead."""
    prefix = f".{out.name}.export-"
    try:
        beside = list(out.parent.iterdir())
    except OSError:
        return  # an unreadable folder: creating the temporary folder there says so
    for path in beside:
        pid = path.name[len(prefix):]
        if not (path.name.startswith(prefix) and pid.isdigit() and path.is_dir() and not path.is_symlink()):
            continue
        if int(pid) == os.getpid() or ownership.owner_alive({"host": socket.gethostname(), "pid": int(pid)}) is False:
            shutil.rmtree(path, ignore_errors=True)  # with this process's pid: left by a dead one whose pid it reuses


def _move_into_place(temporary: Path, out: Path) -> None:
    """Rename the finished folder onto `out`; an old `out` is moved aside first and deleted after."""
    aside = None
    if out.exists() and any(out.iterdir()):
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(aside)
    try:
        os.replace(temporary, out)  # an empty `out` is replaced too (POSIX rename onto an empty directory)
    except OSError as error:
        if aside is not None:
            aside.rename(out)  # put the old one back
        raise ExportError(f"cannot move the finished export into {out}: {error}") from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# -- the Hub -----------------------------------------------------------------------------------------

def hub_token(repo: str) -> str:
    """The Hugging Face token to push with, after checking the repo id; a clear error without one."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise ExportError(f"--push-to-hub {repo!r} is not a Hub repo id (ORG/NAME): {error}") from None
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; unset it where the network is reachable")
    token = get_token()
    if token is None:
        raise ExportError(f"cannot push to {repo}: no Hugging Face credentials (run `hf auth login` or set HF_TOKEN)")
    return token


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload the finished folder to the Hub model repo `repo` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token(repo))
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="Upload with rlhf export")
    except Exception as error:  # noqa: BLE001 - network, permission, quota: huggingface_hub raises many types
        raise ExportError(
            f"pushing {folder} to the Hub as {repo} failed ({type(error).__name__}: {error}); the folder is complete, "
            f"push it later with `hf upload {repo} {folder}`"
        ) from None
    return str(getattr(commit, "commit_url", commit))
