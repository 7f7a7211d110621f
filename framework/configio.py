"""Strict, typed configuration: YAML files and ``--section.field=value`` overrides → nested dataclasses.

Every component owns a ``@dataclass(kw_only=True, slots=True)`` config (framework/ARCHITECTURE.md §2). This
module loads any such class from YAML without knowing it:

* an unknown or misspelt key is a :class:`~longreach.errors.ConfigError` naming the file, the dotted
  key and the nearest valid key (torchtitan dropped TOML because typos silently became defaults);
* values are coerced by the field's annotation — ``int``, ``float``, ``bool``, ``str``, ``Path``,
  ``X | None``, unions, ``list[X]``, ``tuple[X, ...]``, ``dict[K, V]``, ``Literal[...]`` choices (or
  ``field(metadata={"choices": ...})``) and nested dataclasses. PyYAML 1.1 reads ``2e-5`` as a string;
  a ``float`` field turns it into ``2e-05``;
* a wrong type names the key, the expected type and the value; malformed YAML names the file and the
  line; a missing file names the file.

    cfg = load_config(JobConfig, "configs/demo.yaml", ["--train.lr=3e-4", "--parallel.cp=2"])
    save_resolved(cfg, run_dir / "config.yaml"); config_hash(cfg)
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

from longreach.errors import ConfigError

__all__ = [
    "apply_overrides",
    "config_hash",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "resolve_config_path",
    "save_resolved",
    "to_dict",
]

T = TypeVar("T")
_MISSING = dataclasses.MISSING
_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}


# ----------------------------------------------------------------------------------------------------
# YAML reading
# ----------------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

MAX_YAML_NODES = 100_000
"""Bound on the nodes a YAML document expands to once aliases are followed (a config has hundreds;
an alias bomb — anchors referring to anchors — reaches billions and would hang every later step)."""


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes under ``node`` counting each alias use as a full copy (memoised per node: linear time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias (&a [*a]) counts once instead of looping
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_nodes(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    memo[key] = min(total, MAX_YAML_NODES + 1)
    return memo[key]


def _load_yaml_text(text: str, where: str) -> Any:
    """``yaml.load`` with the strict loader, refusing documents whose alias expansion exceeds
    :data:`MAX_YAML_NODES` (checked on the composed node graph, before anything is constructed)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES} values through aliases "
                              "(&anchor/*alias); refusing to load it")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict:
    """A YAML file's top-level mapping, read strictly (duplicate keys, alias bombs and malformed YAML are
    ConfigErrors naming the file and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = _load_yaml_text(text, str(path))  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise ConfigError(f"{where}: malformed YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of sections, "
                          f"got {type(data).__name__}")
    return data


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a recipe shipped in ``longreach.configs`` (``demo`` → ``demo.yaml``).

    Raises:
        ConfigError: neither a file nor a packaged recipe of that name exists (the message lists the
            packaged recipes).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise ConfigError(f"config path {p} is not a file")
    names = _packaged_configs()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name[:-4] if p.name.endswith(".yml") else p.name
    # only bare names (no folder) fall back to the packaged recipes
    if len(p.parts) == 1 and stem in names:
        return names[stem]
    avail = ", ".join(sorted(names)) or "none"
    raise ConfigError(f"config file not found: {path} (packaged recipes: {avail})")


def _packaged_configs() -> dict[str, Path]:
    from importlib import resources

    try:
        root = resources.files("longreach.configs")
    except (ModuleNotFoundError, TypeError):
        return {}
    out: dict[str, Path] = {}
    for entry in root.iterdir():
        name = entry.name
        if name.endswith((".yaml", ".yml")) and entry.is_file():
            out[name.rsplit(".", 1)[0]] = Path(str(entry))
    return out


# ----------------------------------------------------------------------------------------------------
# Type coercion
# ----------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable forward refs: fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


class _CoerceError(Exception):
    """A value that does not fit a type; turned into a ConfigError naming the key by the caller."""


def _coerce(value: Any, tp: Any, key: str, src: str, choices: tuple | None = None) -> Any:
    """Coerce ``value`` to annotation ``tp``; ``key`` is the dotted name used in error messages."""
    out = _coerce_inner(value, tp, key, src)
    if choices is not None and out not in choices:
        raise ConfigError(f"{src}: {key} must be one of {', '.join(map(repr, choices))}; got {value!r}"
                          + _suggest_suffix(str(out), [str(c) for c in choices]))
    return out


def _is_float_text(text: str) -> bool:
    try:
        float(text.strip().replace("_", ""))
    except ValueError:
        return False
    return True


def _fail(value: Any, tp: Any, key: str, src: str) -> typing.NoReturn:
    raise ConfigError(f"{src}: {key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce_inner(value: Any, tp: Any, key: str, src: str) -> Any:
    if tp is Any or tp is object:
        return value
    if isinstance(tp, str):  # unresolved forward reference: keep the value as written
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            _fail(value, tp, key, src)
        errors = []
        members = [a for a in args if a is not type(None)]
        sections = [a for a in members if dataclasses.is_dataclass(a) and isinstance(a, type)]
        if isinstance(value, dict) and len(sections) == 1:
            # an optional section (``model.moe``): its own errors name the misspelt key inside it
            return _coerce_inner(value, sections[0], key, src)
        # exact type matches first so that ``int | str`` keeps 3 an int and "a" a str
        for a in members:
            if isinstance(a, type) and not typing.get_args(a) and type(value) is a:
                return value
        for a in members:
            try:
                return _coerce_inner(value, a, key, src)
            except ConfigError as exc:
                errors.append(exc)
        _fail(value, tp, key, src)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        for choice in args:  # "2" for Literal[2], 2 for Literal["2"]
            if str(value) == str(choice):
                return choice
        raise ConfigError(f"{src}: {key} must be one of {', '.join(map(repr, args))}; got {value!r}"
                          + _suggest_suffix(str(value), [str(a) for a in args]))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key} is a section ({tp.__name__}); expected a mapping, got {value!r}")
        return _build(tp, value, src, prefix=key)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        container = origin or tp
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
            _fail(value, tp, key, src)
        items = list(value)
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{src}: {key} expects {len(args)} items ({_type_name(tp)}), got {value!r}")
            return tuple(_coerce_inner(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(items, args)))
        item_tp = args[0] if args else Any
        coerced = [_coerce_inner(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(items)]
        return container(coerced)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(value, tp, key, src)
        kt, vt = args if args else (Any, Any)
        return {_coerce_inner(k, kt, f"{key}.<key>", src): _coerce_inner(v, vt, f"{key}.{k}", src)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        _fail(value, tp, key, src)
    if tp is int:
        if isinstance(value, bool):
            _fail(value, tp, key, src)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""), 0)
            except ValueError:
                pass
        if isinstance(value, float) or (isinstance(value, str) and _is_float_text(value)):
            # 1e30 or 4.0 for a count is a mistake, not an integer: say so instead of truncating
            raise ConfigError(f"{src}: {key} expects int, got {value!r} (a float; write a whole number "
                              "without a decimal point or exponent)")
        _fail(value, tp, key, src)
    if tp is float:
        if isinstance(value, bool):
            _fail(value, tp, key, src)
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip().replace("_", ""))
            except ValueError:
                _fail(value, tp, key, src)
        else:
            _fail(value, tp, key, src)
        if not math.isfinite(out):
            raise ConfigError(f"{src}: {key} expects a finite float, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(value, tp, key, src)
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        _fail(value, tp, key, src)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception:  # noqa: BLE001
            _fail(value, tp, key, src)
    return value


# ----------------------------------------------------------------------------------------------------
# Building dataclasses
# ----------------------------------------------------------------------------------------------------
def _suggest_suffix(word: str, options: Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return ""


def _unknown_key(src: str, key: str, name: str, valid: list[str], cls: type | None = None) -> ConfigError:
    """The error for a key ``cls`` does not have: a removed key (``cls.__removed_keys__``: name → the setting
    that replaced it) names its replacement, any other the nearest valid key."""
    removed = getattr(cls, "__removed_keys__", {}) if cls is not None else {}
    if name in removed:
        return ConfigError(f"{src}: config key {key!r} was removed; use {removed[name]}")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    prefix = key[: -len(name)]
    if close:
        hint = f"did you mean {prefix + close[0]!r}?"
    else:
        hint = f"valid keys here: {', '.join(valid)}"
    return ConfigError(f"{src}: unknown config key {key!r}; {hint}")


def _choices(f: dataclasses.Field) -> tuple | None:
    c = f.metadata.get("choices") if f.metadata else None
    return tuple(c) if c is not None else None


def _build(cls: type[T], data: dict, src: str, prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if not isinstance(name, str) or name not in fields:
            raise _unknown_key(src, key, str(name), list(fields), cls)
        f = fields[name]
        kwargs[name] = _coerce(value, hints.get(name, f.type), key, src, _choices(f))
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{src}: missing required config key {key!r} ({_type_name(hints.get(name, f.type))})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        where = f"{src}: {prefix}: " if prefix and f"{prefix}." not in str(exc) else f"{src}: "
        raise ConfigError(f"{where}{exc}") from None


def from_dict(cls: type[T], data: dict, *, source: str = "<dict>") -> T:
    """Build ``cls`` strictly from a nested dict (unknown keys and wrong types raise ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    return _build(cls, data, source)


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list/scalar form of a (nested) dataclass config; Paths become strings."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple, set, frozenset)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def config_hash(cfg: Any) -> str:
    """Stable sha256 (hex) of the resolved config (key order and Path/str spelling do not matter)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: a reader never sees half a file).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"# resolved longreach config (sha256 {config_hash(cfg)[:16]})\n")
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any, str]:
    """Split ``--section.field=value`` into (dotted key, YAML-parsed value, raw value text)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.field=value")
    key, raw = body.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write --section.field=value")
    try:
        value = _load_yaml_text(raw, f"override {text!r}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value, raw


def _field_type(cls: type, name: str) -> tuple[Any, dataclasses.Field] | None:
    for f in dataclasses.fields(cls):
        if f.name == name and f.init:
            return _hints(cls).get(name, f.type), f
    return None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return False


def _set_override(cls: type, data: dict, key: str, value: Any, raw: str, src: str) -> None:
    parts = key.split(".")
    node, node_cls, walked = data, cls, []
    for i, part in enumerate(parts):
        walked.append(part)
        dotted = ".".join(walked)
        last = i == len(parts) - 1
        if node_cls is None:  # inside a dict-typed field: any key is allowed
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{src}: {dotted} is not a mapping; cannot set {key!r}")
            continue
        found = _field_type(node_cls, part)
        if found is None:
            valid = [f.name for f in dataclasses.fields(node_cls) if f.init]
            raise _unknown_key(src, dotted, part, valid, node_cls)
        tp, _f = found
        inner = _strip_optional(tp)
        if last:
            # "--run.name=007" keeps the text as typed for str fields; other types use the YAML value
            if _accepts_str(tp) and isinstance(value, (int, float, bool)) and not isinstance(raw, type(None)):
                if raw.strip().lower() not in ("null", "~", "none") and not _exact_non_str(tp, value):
                    value = raw.strip()
            node[part] = value
            return
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, node_cls = child, inner
        elif typing.get_origin(inner) is dict or inner is dict:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, node_cls = child, None
        else:
            raise ConfigError(f"{src}: {dotted} is a {_type_name(tp)} value, not a section; "
                              f"cannot set {key!r}")


def _exact_non_str(tp: Any, value: Any) -> bool:
    """Whether a union annotation also accepts ``value``'s own (non-str) type, e.g. ``int | str``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(a is type(value) for a in typing.get_args(tp))
    return False


def _normalise_overrides(overrides: Iterable[str]) -> list[str]:
    """Accept ``--a.b=v`` and the two-token form ``--a.b v``."""
    items = list(overrides)
    out: list[str] = []
    i = 0
    while i < len(items):
        item = items[i]
        if not isinstance(item, str):
            raise ConfigError(f"override {item!r} is not a string")
        body = item[2:] if item.startswith("--") else item
        if "=" not in body and item.startswith("--") and i + 1 < len(items) and not items[i + 1].startswith("--"):
            out.append(f"{item}={items[i + 1]}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def _merge_overrides(cls: type, data: dict, overrides: Iterable[str], src: str) -> dict:
    for text in _normalise_overrides(overrides):
        key, value, raw = parse_override(text)
        _set_override(cls, data, key, value, raw, f"override {text!r}")
    return data


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """A new config with ``--section.field=value`` overrides applied (``__post_init__`` checks rerun).

    Args:
        cfg: a dataclass config instance.
        overrides: items like ``"--train.lr=2e-5"`` (leading dashes optional; ``["--a.b", "v"]`` also
            works). Values are parsed as YAML scalars, then coerced by the field's type.

    Returns:
        A new instance of ``type(cfg)``; ``cfg`` is not modified.
    """
    overrides = list(overrides)
    if not overrides:
        return cfg
    cls = type(cfg)
    data = _merge_overrides(cls, to_dict(cfg), overrides, "override")
    return _build(cls, data, "override")


def load_config(cls: type[T], path: str | Path | None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (strictly) and apply overrides.

    Args:
        cls: the (nested) dataclass config type, e.g. ``longreach.job.JobConfig``.
        path: a YAML file, the name of a packaged recipe (``"demo"``), or None for the defaults.
        overrides: ``--section.field=value`` strings applied after the file.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: missing file, malformed YAML (file:line), unknown key (with the nearest valid
            one), wrong type, or a failed ``__post_init__`` check.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if path is None:
        data: dict = {}
        src = "defaults"
    else:
        file = resolve_config_path(path)
        data = read_yaml(file)
        src = str(file)
    overrides = list(overrides)
    if overrides:
        # file keys are checked first so that an unknown key names the file, not the override
        _build(cls, dict(data), src)
        src = f"{src} (with overrides)"
        data = _merge_overrides(cls, data, overrides, src)
    return _build(cls, data, src)
