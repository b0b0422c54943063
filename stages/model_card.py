"""The model card `rlhf export` writes (README.md): Hub front matter and a body generated from the registry.

Front matter (the Hub reads it): `base_model` and `license` of the original base down the lineage (a built-in
names them in its spec file, a Hub id is its own base_model, a local folder's own card may name them; `license:
unknown` where nothing says), `base_model_relation`, `library_name`, `pipeline_tag: text-generation`, `tags` (the
project, the stages and algorithms of the lineage) and `datasets` where the training sources are Hub names.
Body: how to load it and which files make it up; the lineage from the original base; per stage its data with
fingerprints, its training config, every held-out metric and benchmark with the evaluation settings.
The card is public: what it shows of the registry passes `public` (credentials scrubbed again at export, for an
entry registered before its secret was known or by an older version; machine-local folders left out).

May import: `stages.core` and `stages.data` (dataset specs' defaults, to leave them out).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import yaml

from stages.core import models
from stages.core.registry import Entry, Registry, RegistryError
from stages.core.secrets import scrub

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")
_LOCAL_ONLY_KEYS = ("output_dir", "logging_dir", "cache_dir")  # where this machine wrote: nothing for a reader
_REF_WITH_VERSION = re.compile(r"^(.+):(\d+|latest)$")


def resolve(ref: str, registry: Registry) -> Entry | None:
    """A parent reference as recorded (`sft:3`, a built-in name, `PATH:0` for a path or Hub id) back to an
    entry; None where it resolves to nothing any more."""
    for candidate in (ref, ref[:-2] if ref.endswith(":0") else None):
        if candidate:
            try:
                return registry.get(candidate)
            except RegistryError:
                continue
    return None


def lineage(entry: Entry, registry: Registry) -> tuple[list[Entry], str | None]:
    """[entry, its parent, ..., the original base], and the parent reference that no longer resolves (or None)."""
    chain, seen = [entry], {entry.ref}
    while chain[-1].parent:
        parent = resolve(chain[-1].parent, registry)
        if parent is None:
            return chain, chain[-1].parent
        if parent.ref in seen:  # a cycle cannot be registered, but a card must never loop
            break
        chain.append(parent)
        seen.add(parent.ref)
    return chain, None


def base_facts(base: Entry) -> dict[str, str]:
    """`base_model` (a Hub id) and `license` of an original base where known."""
    if base.builtin:
        spec = models.builtin_spec(base)
        return {key: str(spec[field]) for key, field in (("base_model", "hub_id"), ("license", "license")) if spec.get(field)}
    path = Path(base.path)
    if path.is_dir() and (path / "README.md").is_file():  # a local model folder: its own card may say
        front = front_matter((path / "README.md").read_text(encoding="utf-8"))
        return {key: str(front[key]) for key in ("base_model", "license") if isinstance(front.get(key), str)}
    if not path.exists() and _HUB_NAME.match(base.path):
        return {"base_model": base.path}
    return {}


def front_matter(card: str) -> dict[str, Any]:
    """The YAML between the leading `---` lines of a model card ({} if none)."""
    if not card.startswith("---\n"):
        return {}
    block = card[4:].split("\n---", 1)[0]
    try:
        parsed = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def hub_datasets(chain: list[Entry], registry: Registry) -> list[str]:
    """The training sources of the lineage that are Hub dataset names (not files, not registry entries)."""
    runs = {entry.run for entry in registry.list(include_builtin=False) if entry.run}
    names = []
    for entry in chain:
        for spec in entry.config.get("datasets") or []:
            source = str(spec.get("source", "")) if isinstance(spec, dict) else ""
            if (
                _HUB_NAME.match(source) and not source.endswith(_DATA_FILE_SUFFIXES) and not Path(source).exists()
                and source.split("/", 1)[0] not in runs and source not in names
            ):
                names.append(source)
    return names


def files_of(folder: Path) -> list[str]:
    return sorted({path.name for path in folder.iterdir() if path.is_file()} | {"README.md"})


def public(value: Any) -> Any:
    """What a public card may show of a recorded value (nested dicts/lists/strings): credentials replaced
    (core/secrets.py), the machine-local folders (`output_dir`, ...) left out, other absolute paths cut to their
    last part (`.../mine.jsonl`)."""
    return _without_local_paths(scrub(value))


def _without_local_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items() if key not in _LOCAL_ONLY_KEYS}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_local_paths(item) for item in value)
    return _short_path(value) if isinstance(value, str) else value


def _short_path(text: str) -> str:
    """An absolute path (a reference `PATH:0` keeps its version) as `.../LAST`; any other text as it is."""
    match = _REF_WITH_VERSION.match(text)
    path, version = (match.group(1), f":{match.group(2)}") if match else (text, "")
    if not path.startswith(("/", "~")) or any(character.isspace() for character in path):
        return text
    return f".../{Path(path).name}{version}" if Path(path).name else text


def render(entry: Entry, registry: Registry, files: list[str]) -> str:
    chain, missing = lineage(entry, registry)
    base = chain[-1]
    facts = base_facts(base) if missing is None else {}
    trained = [e for e in reversed(chain) if e.kind != "base"]
    tags = ["rlhf-stages", "trl"] + list(dict.fromkeys(
        tag for e in trained for tag in (e.stage or e.kind, e.config.get("algorithm")) if isinstance(tag, str)
    ))
    front: dict[str, Any] = {}
    if "base_model" in facts:
        front["base_model"] = facts["base_model"]
        if trained:
            front["base_model_relation"] = "finetune"
    front |= {"license": facts.get("license", "unknown"), "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    datasets = hub_datasets(chain, registry)
    if datasets:
        front["datasets"] = datasets
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {_short_path(entry.name)}", ""]
    lines += [
        f"Exported with `rlhf export` (rlhf-stages) from the registry entry `{_short_path(entry.ref)}`"
        + (f", run `{entry.run}`" if entry.run else "") + (f", created {_when(entry.created)}" if entry.created else "") + ".",
        "",
        *_usage(files),
        "## Lineage",
        "",
        "| | entry | kind | stage | run | created | data fingerprint |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {step} | `{_short_path(e.ref if not e.builtin else e.name)}` | {e.kind} | {e.stage or '-'} | {e.run or '-'} | "
            f"{_when(e.created) if e.created else '-'} | {e.dataset_fingerprint or '-'} |"
            for step, e in enumerate(reversed(chain))
        ],
        "",
        *([f"The lineage stops at `{_short_path(missing)}`: that parent is no longer in the registry.", ""] if missing else []),
        f"Original base: `{_short_path(base.name)}`" + (f" (Hub: `{facts['base_model']}`)" if "base_model" in facts else "")
        + f", licence: {facts.get('license', 'not recorded')}.",
        "",
    ]
    for stage_entry in trained:
        lines += _stage_section(stage_entry)
    return scrub("\n".join(lines))  # a secret the parts above did not show as one (an environment value, a token's shape)


def _usage(files: list[str]) -> list[str]:
    return [
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('PATH_OR_REPO')",
        "tokenizer = AutoTokenizer.from_pretrained('PATH_OR_REPO')",
        "messages = [{'role': 'user', 'content': 'Hello!'}]",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=64)  # generation_config.json: eos = the end-of-turn token",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "Or `rlhf chat PATH`. The model is these files; copy them all: " + ", ".join(f"`{name}`" for name in files) + ".",
        "",
    ]


def _stage_section(entry: Entry) -> list[str]:
    config = public(entry.config)
    lines = [f"## Stage `{entry.stage or entry.kind}`: `{entry.ref}`", ""]
    lines += [f"- parent: `{_short_path(entry.parent or '-')}`"]
    if config.get("algorithm"):
        lines += [f"- algorithm: `{config['algorithm']}`"]
    if config.get("reward_model"):
        lines += [f"- reward model: `{config['reward_model']}`"]
    defaults = _dataset_defaults()
    for spec in config.get("datasets") or []:
        if isinstance(spec, dict):
            shown = {k: v for k, v in spec.items() if k != "source" and v != defaults.get(k) and v not in (None, [], {})}
            lines += [f"- data: `{spec.get('source')}`" + (f" ({_inline(shown)})" if shown else "")]
    lines += [f"- data fingerprint: `{entry.dataset_fingerprint or 'not recorded'}`"]
    if entry.tokenizer_hash:
        lines += [f"- tokenizer hash: `{entry.tokenizer_hash}`, chat template hash: `{entry.chat_template_hash or '-'}`"]
    if entry.wandb_run:
        lines += [f"- W&B run: `{entry.wandb_run}`"]
    metrics = {k: v for k, v in entry.metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    held_out = {key: value for key, value in metrics.items() if key.startswith("eval/")}
    lines += ["", "### Held-out metrics and benchmarks", "", *metrics_table(held_out)]
    lines += ["", "### Training and data", "", *metrics_table({key: value for key, value in metrics.items() if key not in held_out})]
    if isinstance(config.get("eval"), dict):
        lines += ["", "Evaluation settings:", "", "```yaml", yaml.safe_dump({"eval": config["eval"]}, sort_keys=True).rstrip(), "```"]
    training = {k: v for k, v in config.items() if k != "eval"}
    lines += [
        "", "<details><summary>Training config (resolved, secrets removed)</summary>", "", "```yaml",
        yaml.safe_dump(training, sort_keys=True).rstrip(), "```", "", "</details>", "",
    ]
    return lines


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """A Markdown table of metrics, sorted by key (this card's and every stage output's README.md)."""
    if not metrics:
        return ["None recorded."]
    rows = [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in sorted(metrics.items())]
    return ["| metric | value |", "| --- | --- |", *rows]


def _dataset_defaults() -> dict[str, Any]:
    """A dataset spec's default values, left out of the card (every recorded config spells them all out)."""
    from dataclasses import MISSING, asdict, fields

    from stages.data import DatasetSpec

    return asdict(DatasetSpec()) | {f.name: None for f in fields(DatasetSpec) if f.default is MISSING and f.default_factory is MISSING}


def _inline(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in values.items())


def _when(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created))
