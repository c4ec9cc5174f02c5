"""Typed configs: dataclasses filled from YAML files and `--set a.b=c` overrides.

Unknown keys, wrong types, non-finite numbers, values out of a field's range (declared with `checked`)
and missing files are `ConfigError`s naming the key and the file, so a typo in a recipe fails at start-up
instead of silently training with a default or crashing mid-run.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


CHECK = "zhllm_check"  # dataclass field metadata key read by from_dict


@dataclasses.dataclass(frozen=True)
class Check:
    """Allowed values of a numeric or string field (of each item, for a list field)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonblank: bool = False  # strings: an empty path would silently mean the working directory
    nonempty: bool = False  # strings that may be whitespace (the stop string "\n") but not ""

    def problem(self, value) -> str | None:
        """What is wrong with `value`, as the end of "'key' must ...", or None when it is allowed."""
        if isinstance(value, str):
            blank = (self.nonblank and not value.strip()) or (self.nonempty and not value)
            return "not be empty" if blank else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else f"be {self.describe()}"

    def describe(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>=' if self.ge is not None else '>'} {lo[1:]}"
        return f"{'<=' if self.le is not None else '<'} {hi[:-1]}" if hi else "valid"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            nonblank: bool = False, nonempty: bool = False) -> Any:
    """A dataclass field whose configured value `from_dict` checks: `lr: float = checked(3e-4, gt=0)`.

    None (for Optional fields) is always allowed; for list fields every item is checked."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={CHECK: Check(ge=ge, gt=gt, le=le, lt=lt, nonblank=nonblank, nonempty=nonempty)})


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping document is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3). The value is parsed as YAML, so numbers, bools and lists get their type."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a copy of `data` with each `a.b=c` override applied (creating nested mappings as needed)."""
    out = _deep_copy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, anything else in `update` replaces."""
    out = _deep_copy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = _deep_copy(v)
    return out


def _deep_copy(x):
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def from_dict(cls: type[T], data: dict | None, source: str = "<config>", prefix: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from a mapping, checking every key and value type.

    `source` names the file (for messages), `prefix` the dotted path of this section. Keys the mapping leaves out
    keep `base`'s values when given, else the class defaults. A nested section starts from its field's own
    default (a stage's `train` defaults are GRPO's, not TrainSection's), so a recipe that sets two keys of a
    section keeps the stage's choice for the rest.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        section = _section_default(fields[name], hints[name], value)
        if section is not None:
            kwargs[name] = from_dict(hints[name], value, source, f"{prefix}{name}.", base=section)
        else:
            kwargs[name] = _coerce(hints[name], value, source, f"{prefix}{name}")
        _check(fields[name], kwargs[name], source, f"{prefix}{name}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _section_default(f: dataclasses.Field, tp, value):
    """The default instance of a nested dataclass section given as a mapping, or None."""
    if dataclasses.is_dataclass(tp) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()  # (a dataclass instance cannot be a plain default: it is mutable)
    return None


def _check(f: dataclasses.Field, value, source: str, key: str) -> None:
    check = f.metadata.get(CHECK)
    if check is None or value is None:
        return
    for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
        problem = check.problem(item)
        if problem:
            where = key if i is None else f"{key}[{i}]"
            raise ConfigError(f"{source}: '{where}' must {problem}, got {item!r}")


def to_dict(obj) -> dict:
    """A dataclass config as plain dicts/lists (for writing the resolved config.yaml of a run)."""
    return dataclasses.asdict(obj)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, source: str, key: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: '{key}' = {value!r} does not fit type {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value where a list is expected: `--set data.path=dir`
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(val_tp, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:  # YAML reads "3e-4" as a string; accept it as the number users mean
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # no config setting means "infinite" or "NaN"
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{source}: '{key}' = {value} is too large") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict | None = None) -> T:
    """defaults <- YAML file <- overrides, then typed into `cls`."""
    data = dict(defaults or {})
    source = "<defaults>"
    if path is not None:
        data = merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set overrides)" if path else "--set overrides"
    return from_dict(cls, data, source)
