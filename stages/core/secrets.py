"""Keep credentials out of everything a run writes: logs, saved configs, registry entries, W&B files.

Three rules: a key whose name looks like a credential has its value replaced; any string equal to
(or containing) the value of a credential-like environment variable is replaced; and a string that
has the shape of a well-known token (Hugging Face `hf_...`, OpenAI-style `sk-...`, GitHub `ghp_...`,
AWS `AKIA...`) is replaced wherever it appears. W&B's plain 40-hex API keys have no such shape (a
git commit hash looks the same), so they are caught by the first two rules only.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|access_?key|private_?key|credentials?)$", re.IGNORECASE)
_TOKENIZER_TOKEN = re.compile(r"^(pad|eos|bos|unk|sep|cls|mask)_token$")  # tokenizer vocabulary, not credentials
_SECRET_ENV = re.compile(r"(_TOKEN|_KEY|_SECRET|_PASSWORD)$|^(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN)$")
_TOKEN_SHAPE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16})\b")
_MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact ordinary text


def secret_values() -> list[str]:
    """Values of credential-like environment variables, longest first."""
    values = {value for name, value in os.environ.items() if _SECRET_ENV.search(name) and len(value) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def scrub(value: Any, _secrets: list[str] | None = None) -> Any:
    """A copy of `value` (nested dicts/lists/strings) with credentials replaced by a marker."""
    secrets = secret_values() if _secrets is None else _secrets
    if isinstance(value, dict):
        return {
            key: REDACTED if (_is_secret_name(key) and item not in (None, "", False))
            else scrub(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(item, secrets) for item in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return _TOKEN_SHAPE.sub(REDACTED, value)
    return value


def scrub_argv(arguments: list[str]) -> list[str]:
    """Command-line arguments with credentials replaced: `train.hub_token=X`, `--hub_token X`, and any
    argument holding a secret value. For printing commands and for what W&B records of the command line."""
    secrets, cleaned, redact_next = secret_values(), [], False
    for argument in arguments:
        if redact_next:
            cleaned.append(REDACTED)
            redact_next = False
            continue
        key, separator, value = argument.partition("=")
        leaf = key.lstrip("-").split(".")[-1]
        if _is_secret_name(leaf) and separator and value:
            cleaned.append(f"{key}={REDACTED}")
            continue
        redact_next = argument.startswith("--") and not separator and _is_secret_name(leaf)
        cleaned.append(scrub(argument, secrets))
    return cleaned


def _is_secret_name(key: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_NAME.search(key)) and not _TOKENIZER_TOKEN.match(key)
