"""The one config system: dataclasses loaded from YAML or dicts, ``key=value`` overrides, YAML write-back.

Every runner's settings are dataclasses, nested where they nest (a pretraining config holds a ``TrainConfig``),
with ``Literal[...]`` choices and a comment or docstring per field. This module builds them and writes them back,
the same way for every config:

* :func:`from_dict` builds a dataclass from a mapping, recursing into nested dataclasses. It coerces what YAML
  gives (``"1e-3"`` or ``3`` to a float, lists to tuples, ``"true"`` to a bool), checks ``Literal`` choices, and
  refuses an unknown key by naming its dotted path and the valid keys (``unknown key 'train.lrr'; valid keys
  of train: [...]``).
* :func:`apply_overrides` sets dotted keys from ``key=value`` strings whose values are parsed as YAML
  (``train.lr=2e-4``, ``model.drop_path_rate=0.1``, ``train.betas=[0.9,0.999]``).
* :func:`to_dict` / :func:`to_yaml` write a config back (tuples as lists), and :func:`load_config` reads one.
* :func:`add_config_arguments` and :func:`config_from_args` give every command the same CLI:
  ``--config FILE``, ``key=value`` overrides anywhere on the line, and ``--print-config``.

Paths: every path a config or a command line names (``data_dir``, ``tokenizer``, ``model.init``, ``data.text``,
``text_tokenizer``, ``--model``, ...) is read from the working directory when it is relative, by every command;
:func:`resolve_path` is that rule. Paths inside data files (``image_path`` in a jsonl index) are relative to
their data folder instead (docs/data.md, "Paths").

A nested section given only in part keeps its default's other values: with a field
``train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/x", max_steps=300))``,
``train.lr=1e-4`` changes the learning rate and keeps ``out_dir`` and ``max_steps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not fit its dataclass: an unknown key, a wrong type or a value outside its choices."""


# ---------------------------------------------------------------------------------------------------------------
# YAML


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5E+2`` as floats (YAML 1.1, and so PyYAML, needs a dot: ``1.0e-3``)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def resolve_path(value: str | os.PathLike, key: str, must_exist: bool = False) -> Path:
    """The one rule for a path given in a config or on the command line: ``~`` expanded, absolute as given,
    relative read from the working directory (never from a data folder).

    key: the config key or flag the path came from, named in the error. must_exist: a missing file or folder
    raises FileNotFoundError naming ``key``, the path and the working directory it was read from.
    """
    path = Path(value).expanduser()
    if must_exist and not path.exists():
        where = "" if path.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"
        raise FileNotFoundError(f"{key}: {value} not found{where}")
    return path


def load_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, with ``2e-3`` read as a float rather than a string."""
    return yaml.load(text, Loader=_YAMLLoader)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (an empty file is ``{}``); anything else is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = load_yaml(path.read_text())
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# building dataclasses from mappings


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every init field of the dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    """``value`` as ``bool``/``int``/``float``/``str``/``Path``, accepting what YAML and the command line give."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML reads `name: 2024` as an int
            return str(value)
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def check_choice(value: Any, choices: Sequence[Any], where: str) -> Any:
    """``value`` if it is one of ``choices``; else a :class:`ConfigError` naming the field and the choices."""
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not supported; accepted values: {', '.join(map(repr, choices))}")
    return value


def check_literals(obj: Any, where: str = "") -> None:
    """Check every ``Literal``-typed field of the dataclass instance ``obj`` (for ``__post_init__``: direct
    construction gets the same check as :func:`from_dict`)."""
    for name, tp in field_types(type(obj)).items():
        if typing.get_origin(tp) is Literal:
            check_choice(getattr(obj, name), typing.get_args(tp), _join(where, name))


def coerce(value: Any, tp: Any, where: str = "value") -> Any:
    """``value`` (as read from YAML) converted to the type annotation ``tp``.

    Handles ``Any``, dataclasses (from mappings), ``Literal`` choices, unions (``X | None``), ``tuple[...]``,
    ``list[...]``, ``dict[...]`` and scalars. ``where`` names the value in errors (a dotted key path).
    """
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return check_choice(value, args, where)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got None")
        arms = [a for a in args if a is not type(None)]
        for arm in arms:  # an exact match wins (an int for `int | str`), then the first arm that converts
            arm_type = typing.get_origin(arm) or arm
            if isinstance(arm_type, type) and not dataclasses.is_dataclass(arm_type) and type(value) is arm_type:
                return coerce(value, arm, where)
        for arm in arms:
            try:
                return coerce(value, arm, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, where)
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r} ({type(value).__name__})")
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list for {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values for {_type_name(tp)}, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list for {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        item = args[0] if args else Any
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        key_type, value_type = args if args else (Any, Any)
        return {coerce(k, key_type, f"{where} key"): coerce(v, value_type, _join(where, str(k))) for k, v in value.items()}
    if tp in (bool, int, float, str, Path):
        return _coerce_scalar(value, tp, where)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"{where}: cannot read a value of type {_type_name(tp)} from a config")


def check_keys(data: Mapping[str, Any], valid: Iterable[str], section: str, prefix: str | None = None) -> None:
    """Refuse keys of ``data`` outside ``valid``: a :class:`ConfigError` naming each unknown key by its dotted path
    (``prefix.key``; ``prefix`` defaults to ``section``) and the valid keys of ``section``."""
    valid = set(valid)
    unknown = [k for k in data if k not in valid]
    if unknown:
        prefix = section if prefix is None else prefix
        keys = ", ".join(repr(_join(prefix, str(k))) for k in unknown)
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {keys}; valid keys of {section}: {sorted(valid)}")


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, recursively (see the module docstring).

    Args:
        cls: a dataclass type.
        data: its keys: field names, nested mappings for nested dataclass fields.
        where: the dotted path of ``data`` inside the whole config (``"train"``), used in error messages.

    Raises:
        ConfigError: an unknown key (naming its path and the valid keys), a missing required key, a value of the
            wrong type or outside its ``Literal`` choices, or a value the dataclass's own checks refuse.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    section = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a mapping of {cls.__name__} keys, got {data!r} ({type(data).__name__})")
    types_ = field_types(cls)
    check_keys(data, types_, where or cls.__name__, prefix=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    missing = []
    for name, tp in types_.items():
        path = _join(where, name)
        if name in data:
            value = data[name]
            default = _default_of(fields[name])
            if isinstance(value, Mapping) and dataclasses.is_dataclass(default) and not isinstance(default, type):
                value = {**to_dict(default), **value}  # a partial section keeps its default's other values
            kwargs[name] = coerce(value, tp, path)
        elif _default_of(fields[name]) is dataclasses.MISSING:
            missing.append(path)
    if missing:
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} {missing} of {section}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{section}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# writing back


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML-able data: dataclasses as dicts (init fields), tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """A config as YAML text, keys in field order; :func:`load_yaml` + :func:`from_dict` read it back equal."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write :func:`to_yaml` of ``cfg`` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


# ---------------------------------------------------------------------------------------------------------------
# overrides

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", 0.0002)``: a dotted key and a value parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. train.lr=2e-4")
    try:
        return key, load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None


def deep_update(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key="a.b.c"`` in place, creating missing sections (nested mappings are
    copied before they are changed, so the caller's nested dicts are left alone)."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ConfigError(f"{key}: {'.'.join(parents[: i + 1])} is a value ({child!r}), not a section")
        node[part] = child = dict(child)
        node = child
    node[leaf] = value


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """``cfg`` with ``key=value`` overrides applied (dotted keys, values parsed as YAML).

    ``cfg`` is a dataclass instance (a new instance is returned, rebuilt and checked with :func:`from_dict`) or
    a mapping (a new dict is returned; unknown keys are found when it is built into a dataclass).
    """
    is_config = dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
    data: dict[str, Any] = to_dict(cfg) if is_config else dict(cfg)  # type: ignore[arg-type]
    for item in overrides:
        key, value = parse_override(item)
        try:
            set_dotted(data, key, value)
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return from_dict(type(cfg), data) if is_config else data  # type: ignore[return-value]


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """``cls`` built from ``base`` (defaults), the YAML file ``path`` merged over it, then ``overrides``."""
    data = dict(base or {})
    if path is not None:
        data = deep_update(data, read_yaml_mapping(path))
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        source = f"{path}" if path is not None else cls.__name__
        raise ConfigError(f"{source}{' + overrides' if overrides else ''}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# the command line

_OVERRIDES_DEST = "overrides"


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str = "a YAML config file",
                         default_config: str | None = None) -> argparse.ArgumentParser:
    """Give ``parser`` the one config syntax: ``--config FILE``, ``key=value`` overrides (values parsed as YAML,
    anywhere on the line) and ``--print-config`` (print the resolved config as YAML and exit 0). Read them with
    :func:`config_from_args`."""
    parser.add_argument("--config", metavar="FILE", default=default_config, help=config_help)
    parser.add_argument(_OVERRIDES_DEST, nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides with dotted keys, values parsed as YAML (train.lr=2e-4 model.drop_path_rate=0.1)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.set_defaults(_takes_overrides=True)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` that also collects ``key=value`` overrides given after options
    (``finetune vqav2 --config f.yaml train.lr=2e-4``), which argparse alone leaves unrecognised."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = getattr(args, "_takes_overrides", False)
        overrides = [a for a in extra if takes_overrides and "=" in a and not a.startswith("-")]
        rest = [a for a in extra if a not in overrides]
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        setattr(args, _OVERRIDES_DEST, [*getattr(args, _OVERRIDES_DEST, []), *overrides])
    return args


def config_from_args(cls: type[T], args: argparse.Namespace, base: Mapping[str, Any] | None = None,
                     updates: Mapping[str, Any] | None = None) -> T:
    """The config of a command: ``base`` (defaults), then ``--config``, then ``updates`` (values the command's own
    flags set), then the ``key=value`` overrides. With ``--print-config`` it prints the YAML and exits 0."""
    data = dict(base or {})
    path = getattr(args, "config", None)
    if path is not None:
        data = deep_update(data, read_yaml_mapping(path))
    if updates:
        data = deep_update(data, updates)
    overrides = list(getattr(args, _OVERRIDES_DEST, []) or [])
    data = apply_overrides(data, overrides)
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        source = f"{path}" if path is not None else "config"
        raise ConfigError(f"{source}{' + overrides' if overrides else ''}: {e}") from None
    if getattr(args, "print_config", False):
        sys.stdout.write(to_yaml(cfg))
        raise SystemExit(0)
    return cfg
