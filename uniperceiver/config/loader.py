"""Typed configuration loading: YAML files (with ``_base_`` inheritance) plus
``key.path=value`` command-line overrides, converted strictly into nested
dataclasses.

Schema-agnostic: the dataclasses themselves live in ``schema.py``.  Every error
is a :class:`ConfigError` naming the offending key path and where its value came
from (a file or a command-line override), because a typo three includes deep
should cost seconds, not a failed multi-node launch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from ..utils.errors import BadInput
from ..utils.resources import config_dir, find_config

__all__ = [
    "ConfigError",
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_yaml",
    "parse_cli",
    "to_dict",
]

T = TypeVar("T")
# key path ("model.encoder.dim") -> "configs/x.yaml" or "command-line override 'a=1'"
Provenance = dict[str, str]


class ConfigError(ValueError, BadInput):
    """A config file, override or value is invalid; the message says where."""


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with two fixes for hand-written configs:

    * ``1e-4`` / ``1.0e5`` load as floats (YAML 1.1, hence PyYAML, would return
      the *string* '1e-4' -- the classic learning-rate trap);
    * duplicate keys are an error instead of silently keeping the last one.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# add_implicit_resolver copies the resolver table for the subclass; SafeLoader is untouched.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""", re.X),
    list("-+0123456789."),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(err, 'problem', None) or err}"


def _read_mapping(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (nor a packaged config of that name under "
                          f"{config_dir()})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {path}{_yaml_problem(e)}") from e
    if data is None:  # empty file or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


# ---------------------------------------------------------- merging + provenance


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def _sources(value: Any, source: str, path: str = "") -> Provenance:
    """Provenance entries for `value` (placed at `path`) and every mapping key below it."""
    out = {path: source} if path else {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_sources(v, source, _join(path, k)))
    return out


def _merge(dst: dict, dst_prov: Provenance, src: dict, src_prov: Provenance, prefix: str = "") -> None:
    """Deep-merge `src` into `dst` in place: mappings merge key by key; anything
    else (lists and null included) replaces.  Provenance moves with the values."""
    for key, value in src.items():
        path = _join(prefix, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], dst_prov, value, src_prov, path)
        else:
            for stale in [p for p in dst_prov if _under(p, path)]:
                del dst_prov[stale]
            dst[key] = copy.deepcopy(value)  # never alias YAML anchors across files
            dst_prov.update({p: s for p, s in src_prov.items() if _under(p, path)})
        dst_prov[path] = src_prov[path]


def _load(path: str, chain: tuple[str, ...]) -> tuple[dict, Provenance]:
    if os.path.realpath(path) in {os.path.realpath(p) for p in chain}:
        raise ConfigError("config _base_ include cycle: " + " -> ".join((*chain, path)))
    raw = _read_mapping(path)
    bases = raw.pop("_base_", None)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, type(None))) or not all(isinstance(b, str) for b in bases or ()):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    data: dict = {}
    prov: Provenance = {}
    for base in bases or ():  # later bases override earlier ones, the file itself overrides all
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"base config '{base}' included from {path} not found (looked for {base_path})")
        _merge(data, prov, *_load(base_path, (*chain, path)))
    _merge(data, prov, raw, _sources(raw, path))
    return data, prov


def load_yaml(path: str | os.PathLike, *, provenance: Provenance | None = None) -> dict:
    """Read a YAML mapping, resolving ``_base_`` includes (relative to the including
    file) recursively.  If `provenance` is given, it is filled with key path -> file."""
    data, prov = _load(os.fspath(path), ())
    if provenance is not None:
        provenance.update(prov)
    return data


def _descend(data: dict, parts: list[str], item: str, provenance: Provenance | None,
             source: str) -> tuple[dict, str]:
    """The mapping that holds `parts[-1]` and its key path as from_dict names it (list items by
    index: "tasks[1]"), creating intermediate mappings. A list of named mappings is entered by
    name: `tasks.<name>.<key>`."""
    node, path, i = data, "", 0
    while i < len(parts) - 1:
        part, child = parts[i], node.get(parts[i])
        if isinstance(child, list) and i + 2 < len(parts):
            names = [x.get("name") if isinstance(x, dict) else None for x in child]
            if parts[i + 1] not in names:
                raise ConfigError(f"override '{item}': no item named {parts[i + 1]!r} in '{_join(path, part)}' "
                                  f"(names: {', '.join(str(n) for n in names if n is not None) or 'none'})")
            index = names.index(parts[i + 1])
            path, node, i = f"{_join(path, part)}[{index}]", child[index], i + 2
            continue
        path = _join(path, part)
        if child is None:
            node[part] = {}
            if provenance is not None:
                provenance[path] = source
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{path}' is a {type(child).__name__}, not a mapping")
        node, i = node[part], i + 1
    return node, path


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], *,
                    provenance: Provenance | None = None) -> dict:
    """Return a copy of `data` with each ``a.b.c=value`` applied (value parsed as YAML).

    Intermediate mappings are created where absent (or null); unknown keys are left
    for :func:`from_dict` to reject, citing the override via `provenance`."""
    data = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"malformed override '{item}': expected key.path=value")
        try:
            value = yaml.load(text, Loader=_Loader)  # noqa: S506
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of override '{item}'{_yaml_problem(e)}") from None
        source = f"command-line override '{item}'"
        node, path = _descend(data, parts, item, provenance, source)
        node[parts[-1]] = value
        if provenance is not None:
            full = _join(path, parts[-1])
            for stale in [p for p in provenance if _under(p, full)]:
                del provenance[stale]
            provenance.update(_sources(value, source, full))
    return data


# ------------------------------------------------------------ dict -> dataclass


@dataclasses.dataclass(frozen=True)
class _Ctx:
    default: str | None  # used where no provenance entry covers a path
    prov: Mapping[str, str]

    def where(self, path: str) -> str:
        """' (from SOURCE)' for the closest recorded ancestor of `path`."""
        while path:
            if path in self.prov:
                return f" (from {self.prov[path]})"
            path = path[: max(path.rfind("."), path.rfind("["), 0)]
        return f" (from {self.default})" if self.default else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _convert(value: Any, tp: Any, path: str, ctx: _Ctx) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None and tp in (list, tuple, dict):  # bare containers: any items
        origin = tp

    def mismatch(expected: str | None = None) -> ConfigError:
        return ConfigError(f"config key '{path}'{ctx.where(path)} expects "
                           f"{expected or _type_name(tp)}, got {_describe(value)}")

    if tp is Any or tp is object:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise mismatch()
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        errors = []
        for option in options:  # first matching option wins (so `int | float` keeps ints)
            try:
                return _convert(value, option, path, ctx)
            except ConfigError as e:
                errors.append(e)
        # Optional[Dataclass] / Optional[list[...]]: the inner error points deeper, keep it.
        if len(options) == 1 and (dataclasses.is_dataclass(options[0]) or typing.get_origin(options[0])):
            raise errors[0]
        raise mismatch()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise mismatch()
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _from_dict(tp, value, path, ctx)
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise mismatch()
    if tp is int or tp is float:  # bool is a subclass of int, but `True` is never a count
        if isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool):
            return tp(value)
        raise mismatch()
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
            items = [args[0] if args else Any] * len(value)
        else:
            items = list(args)
            if len(items) != len(value):
                raise mismatch(f"{_type_name(tp)} ({len(items)} items)")
        out = [_convert(v, t, f"{path}[{i}]", ctx) for i, (v, t) in enumerate(zip(value, items))]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise mismatch()
        key_tp, value_tp = args or (Any, Any)
        return {_convert(k, key_tp, _join(path, k), ctx): _convert(v, value_tp, _join(path, k), ctx)
                for k, v in value.items()}
    if origin is None and isinstance(tp, type):  # any other plain class: accept instances only
        if isinstance(value, tp):
            return value
        raise mismatch()
    raise TypeError(f"config key '{path}': unsupported field annotation {tp!r}")


def _unknown_key(key: Any, path: str, valid: list[str], ctx: _Ctx) -> ConfigError:
    full = _join(path, key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean '{_join(path, close[0])}'?" if close else "."
    scope = f"under '{path}'" if path else "at top level"
    valid_keys = f"Valid keys {scope}: {', '.join(valid)}" if valid else f"'{path}' takes no keys"
    return ConfigError(f"unknown config key '{full}'{ctx.where(full)}{hint} {valid_keys}")


def _from_dict(cls: type[T], data: Any, path: str, ctx: _Ctx) -> T:
    label = f" '{path}'" if path else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config{label}{ctx.where(path)} expects a mapping for {cls.__name__}, "
                          f"got {_describe(data)}")
    hints = typing.get_type_hints(cls)  # resolves `from __future__ import annotations` strings
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(key, path, list(fields), ctx)
    kwargs = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key_path, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key_path}'{ctx.where(path)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # the schema's own __post_init__ validation
        raise ConfigError(f"invalid config{label}{ctx.where(path)}: {e}") from e


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str | None = None,
              provenance: Mapping[str, str] | None = None, path: str = "") -> T:
    """Strictly build dataclass `cls` from `data`: unknown keys, wrong types and
    missing required fields raise :class:`ConfigError`.  Error messages cite
    ``provenance[key_path]`` when known, else `source`; `path` prefixes key paths."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    return _from_dict(cls, data, path, _Ctx(source, provenance or {}))


# ------------------------------------------------------------ dataclass -> dict


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def to_dict(obj: Any) -> dict:
    """Dataclass (or mapping) -> plain dicts/lists/scalars; `from_dict` inverts it."""
    if not (isinstance(obj, Mapping) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))):
        raise TypeError(f"to_dict expects a dataclass instance or a mapping, got {type(obj).__name__}")
    return _plain(obj)


def dump_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config to `path` (creating directories) so a run records it."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ------------------------------------------------------------------ entry point


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                *, data: Mapping[str, Any] | None = None) -> T:
    """YAML file (or an in-memory `data` mapping) + overrides -> validated `cls` instance.

    `path` is a file, or a packaged config by its short name (`zeroshot/imagenet1k`, see
    :func:`uniperceiver.utils.resources.find_config`)."""
    if path is not None and data is not None:
        raise ConfigError("load_config: pass either a config path or data, not both")
    prov: Provenance = {}
    if path is not None:
        path = find_config(path)
        data = load_yaml(path, provenance=prov)
    data = apply_overrides(data or {}, overrides, provenance=prov)
    return from_dict(cls, data, source=None if path is None else os.fspath(path), provenance=prov)


def parse_cli(argv: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """Split ``CONFIG.yaml key.path=value ...`` (default: ``sys.argv[1:]``) into
    the config path and the list of overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: CONFIG.yaml [key.path=value ...]"
    if not args or args[0].startswith("-") or ("=" in args[0] and not os.path.isfile(args[0])):
        raise ConfigError(f"the first argument must be a config file path; {usage}")
    for arg in args[1:]:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"unexpected argument '{arg}': after the config path, every argument "
                              f"must be a key.path=value override; {usage}")
    return args[0], args[1:]
