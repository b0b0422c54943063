"""Typed stage configs: YAML gives values, `key=value` arguments override them, unknown keys are errors.

Every stage declares one dataclass. Nested dataclasses are sections (`data.max_length=256` reaches
them); a section typed as a TRL config (e.g. `trl.SFTConfig`) is validated against that config's own
fields and types, so the whole TRL surface is available without restating it and a misspelt key is
caught before any compute is spent. Validation happens once, here: values are never rewritten later.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from stages.core.errors import UserError

ConfigT = TypeVar("ConfigT")


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


def load_config(cls: type[ConfigT], argv: list[str]) -> ConfigT:
    """Parse `--config FILE [key=value ...]` (plus the launcher's `--local_rank N`) into `cls`."""
    config_path, overrides = _split_argv(argv)
    values: dict[str, Any] = {}
    if config_path is not None:
        values = read_yaml(config_path)
    for override in overrides:
        key, _, raw = override.partition("=")
        set_dotted(values, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return build(cls, values, source=str(config_path) if config_path else "command line")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(values).__name__}")
    return values


def set_dotted(values: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `a.b.c=value` inside nested dicts, creating sections as needed."""
    if not dotted_key:
        raise ConfigError(f"override {dotted_key!r} has no key (expected key=value)")
    *sections, leaf = dotted_key.split(".")
    node = values
    for section in sections:
        child = node.get(section)
        if child is None:
            child = node[section] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted_key!r}: {section!r} is not a section")
        node = child
    node[leaf] = value


def build(cls: type[ConfigT], values: dict[str, Any], source: str = "config", prefix: str = "") -> ConfigT:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or '<root>'} must be a mapping")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(source, prefix + str(key), key, fields))
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    missing = [
        name
        for name, field in fields.items()
        if name not in kwargs
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required value for {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: invalid {prefix.rstrip('.') or cls.__name__}: {error}") from None


def validate_section(cls: type, values: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """Check a mapping against a (large, external) dataclass's fields without instantiating it.

    Used for TRL/transformers training arguments, whose constructors touch devices and the
    distributed state; the stage instantiates them later with exactly these checked values.
    """
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in (values or {}).items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(source, prefix + str(key), key, fields))
        checked[key] = _coerce(value, hints.get(key, Any), prefix + key, source)
    return checked


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (for saving and registry entries)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def field_help(cls: type) -> dict[str, str]:
    """The help text of each field, for `--help` output."""
    return {field.name: field.metadata.get("help", "") for field in dataclasses.fields(cls)}


def wants_help(argv: list[str]) -> bool:
    return any(argument in ("-h", "--help") for argument in argv)


def usage(cls: type, command: str) -> str:
    """`--help` text: the command line, then every top-level key with its default and help."""
    lines = [f"usage: {command}", "", "keys (in the YAML file or as key=value; dotted keys reach sections):"]
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = "see the shipped configs"
        else:
            default = "required"
        lines.append(f"  {field.name:<22} {field.metadata.get('help', '')} [{default}]")
    return "\n".join(lines)


def _split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    config_path = None
    overrides: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument in ("--config", "-c"):
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config_path = argv[index + 1]
            index += 2
            continue
        if argument.startswith("--config="):
            config_path = argument.split("=", 1)[1]
        elif argument == "--local_rank" or argument == "--local-rank":
            index += 2  # the deepspeed launcher appends it; LOCAL_RANK in the environment says the same
            continue
        elif argument.startswith(("--local_rank=", "--local-rank=")):
            pass
        elif "=" in argument:
            overrides.append(argument[2:] if argument.startswith("--") else argument)
        else:
            raise ConfigError(f"unexpected argument {argument!r}: expected --config FILE or key=value")
        index += 1
    return config_path, overrides


def _unknown_key_message(source: str, dotted: str, key: Any, fields: dict[str, Any]) -> str:
    message = f"{source}: unknown key {dotted!r}"
    close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check `value` against a type annotation, converting only lossless cases (int→float, '3e-4'→float)."""
    if annotation is Any or annotation is typing.Any:
        return value
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        if type(value) in options:  # exact type first: 10 stays an int in `int | float`
            return value
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{source}: {key}={value!r} does not match {_type_name(annotation)}")
    if origin is Literal:
        if value not in get_args(annotation):
            choices = ", ".join(repr(choice) for choice in get_args(annotation))
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}")
        return value
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        return [_coerce(item, item_type, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return build(annotation, value if value is not None else {}, source, prefix=key + ".")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if value is False and "no" in {member.value for member in annotation}:
            value = "no"  # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means "no"
        try:
            annotation(value)
            return value  # validated; kept as written so saved configs stay plain YAML/JSON
        except ValueError:
            choices = ", ".join(repr(member.value) for member in annotation)
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a run name of digits
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return value
    if annotation is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return value
    return value  # other types (callables, tensors) are not settable from YAML; accept as given


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")
