"""The core layer: what every stage, trainer and reward model stands on.

Lives here: typed configs (`config`), the user-error base class (`errors`), the model registry
(`registry`) and who owns its unfinished entries (`ownership`: heartbeats, what gc may remove), secret
scrubbing (`secrets`), W&B tracking (`tracking`), processes and DeepSpeed plumbing (`distributed`), model and
tokenizer loading (`models`), the KV cache of our decode loop (`kv_cache`), checkpoints and LoRA merging
(`checkpoints`), atomic file writes (`files`) and the files shipped inside the package (`paths`,
`resources/`: the built-in model configs and the byte-level tokenizer).

May import: the standard library and third-party packages, nothing of ours outside `stages.core`
(checked by import-linter, see pyproject.toml). `config`, `errors`, `files`, `ownership`, `paths`, `registry`
and `secrets` import neither torch nor transformers, so the registry commands of the CLI start fast.
"""
