"""Keep credentials out of everything a run writes: logs, saved configs, registry entries, W&B config.

Two rules: a key whose name looks like a credential has its value replaced, and any string equal to
(or containing) the value of a credential-like environment variable is replaced too.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|access_?key|private_?key|credentials?)$", re.IGNORECASE)
_TOKENIZER_TOKEN = re.compile(r"^(pad|eos|bos|unk|sep|cls|mask)_token$")  # tokenizer vocabulary, not credentials
_SECRET_ENV = re.compile(r"(_TOKEN|_KEY|_SECRET|_PASSWORD)$|^(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN)$")
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
        return value
    return value


def _is_secret_name(key: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_NAME.search(key)) and not _TOKENIZER_TOKEN.match(key)
