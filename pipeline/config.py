"""params.yaml -> typed, documented config dataclasses.

Every stage owns one dataclass (defined next to the stage, like TRL's ``<algo>_config.py``)
whose fields carry a docstring-style comment, and reads only its own section of
``params.yaml``. This module only knows how to fill such a dataclass:

    cfg = load_section(SFTConfig, "sft", params="params.yaml", overrides=["lr=1e-4"])

Unknown keys, missing required keys and wrongly typed values are InputErrors that name
the file and the dotted field (``params.yaml: sft.lr: expected float, got 'fast'``).
CLI ``--set key=value`` overrides are parsed as YAML scalars and validated the same way.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pipeline.io import input_error, load_yaml, parse_yaml

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
DEFAULT_PARAMS = "params.yaml"


def read_params(params: str | os.PathLike = DEFAULT_PARAMS) -> dict:
    data = load_yaml(params)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise input_error(params, None, "a mapping of stage sections", type(data).__name__)
    return data


def _coerce(value: Any, tp: Any, path: str, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, field)
            except Exception as e:  # noqa: BLE001 - try the next member of the union
                errs.append(e)
        raise input_error(path, field, " or ".join(getattr(a, "__name__", str(a)) for a in args), value)
    if origin is typing.Literal:
        if value not in args:
            raise input_error(path, field, "one of " + ", ".join(map(repr, args)), value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise input_error(path, field, "a list", value)
        inner = args[0] if args else Any
        return [_coerce(v, inner, path, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise input_error(path, field, "a mapping", value)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, field)
    if tp is bool:
        if not isinstance(value, bool):
            raise input_error(path, field, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise input_error(path, field, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; every user writes it so
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise input_error(path, field, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise input_error(path, field, "a string", value)
        return value
    return value


def from_dict(cls: type[T], data: Any, path: str | os.PathLike = "<params>", section: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key against its fields."""
    path = str(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise input_error(path, section or None, "a mapping", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise input_error(path, f"{section}.{unknown[0]}" if section else unknown[0],
                          "one of the known fields " + ", ".join(sorted(fields)), unknown[0])
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{section}.{name}" if section else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path, dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise input_error(path, dotted, "a value (this field is required)")
    return cls(**kwargs)


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["lr=1e-4", "lora.rank=8"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise input_error("--set", item, "key=value")
        key, raw = item.split("=", 1)
        val = parse_yaml(raw, "--set") if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_section(cls: type[T], section: str, params: str | os.PathLike = DEFAULT_PARAMS,
                 overrides: list[str] | None = None) -> T:
    """Read ``params[section]`` into ``cls`` (a missing params file means all defaults)."""
    data = read_params(params) if Path(params).exists() else {}
    sec = data.get(section, {})
    sec = _merge(sec or {}, parse_overrides(overrides))
    return from_dict(cls, sec, params, section)


@dataclasses.dataclass
class BaseConfig:
    """``params.yaml: base`` — knobs shared by every stage."""

    seed: int = 0
    """Seed for every generator and trainer (each derives its own stream from it)."""
    model: str = "tiny"
    """Model preset: ``tiny`` | ``tiny-xs`` | ``smollm2-vl`` | ``qwen2.5-vl-3b`` | ``qwen2.5-vl-7b`` | a local path."""
    threads: int = 1
    """torch CPU threads. 1 by default: on a shared 2-core box 2 threads were measured 7-30x slower."""


def load_base(params: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | None = None) -> BaseConfig:
    return load_section(BaseConfig, "base", params, overrides)


# ----------------------------------------------------------------------------- dotted keys


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": scalar}; lists are kept as values (what `dvc metrics show` does)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def get_dotted(d: Mapping[str, Any], key: str) -> Any:
    """``get_dotted(m, "main.score")`` (metrics) or ``get_dotted(params, "base.seed")``; ``None`` when any
    part is missing."""
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
