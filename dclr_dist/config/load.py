"""Reading a config: YAML files (a path or a shipped recipe's name), saved trees and
``key=value`` overrides, each value coerced to its field's type and the whole validated."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dclr_dist.config.errors import ConfigError
from dclr_dist.config.run import Config


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error.

    PyYAML lets the later one win silently: a second ``train:`` section would drop the first.
    Checked as each mapping is composed, before merge keys (``<<: *base``, YAML's own way to
    override a key) are flattened into it.
    """

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(key, line, first[key])
            first[key] = line
        return node


# The recipes shipped with the package (dclr_dist/configs/*.yaml), found by name from any directory.
RECIPES = Path(__file__).parents[1] / "configs"

# Keys that moved when the sections were split by owner: a saved config (a checkpoint's
# meta.json) is read in today's keys; a YAML file or override using one is told the new name.
MOVED = {
    "train.workers": "cluster.workers",
    "train.gpus_per_worker": "cluster.gpus_per_worker",
    "train.cpus_per_worker": "cluster.cpus_per_worker",
    "train.max_failures": "cluster.max_failures",
    "train.optimizer": "optim.name",
    "train.lr": "optim.lr",
    "train.ref_batch": "optim.ref_batch",
    "train.momentum": "optim.momentum",
    "train.weight_decay": "optim.weight_decay",
    "train.warmup_epochs": "optim.warmup_epochs",
    "train.schedule": "optim.schedule",
    "train.milestones": "optim.milestones",
    "train.grad_clip": "optim.grad_clip",
    "train.precision": "engine.precision",
    "train.zero_stage": "engine.zero_stage",
    "train.cudnn_benchmark": "engine.cudnn_benchmark",
    "train.channels_last": "engine.channels_last",
    "train.compile": "engine.compile",
    "train.checkpoint_every": "checkpoint.every",
    "train.checkpoint_minutes": "checkpoint.minutes",
    "train.keep_checkpoints": "checkpoint.keep",
    "eval.finetune_epochs": "finetune.epochs",
    "eval.finetune_lr": "finetune.lr",
    "data.workers": "data.loader_workers",
    "views.where": "views.augment_on",
    "model.m": "model.momentum",
    "eval.k": "eval.knn_k",
    "eval.t": "eval.knn_temperature",
}


def recipe_path(path: str | Path) -> Path:
    """``path``, or the shipped recipe it names (``demo``, ``k400_r2plus1d``, ``downstream/r2plus1d_18``)
    when no such file exists here."""
    path = Path(path)
    shipped = RECIPES / f"{path}.yaml"
    return shipped if not path.exists() and path.suffix == "" and shipped.is_file() else path


def read_yaml(
    path: str | Path,
    error_type: type[Exception] = ConfigError,
    what: str = "config file",
    *,
    not_found_hint: typing.Callable[[], str] | None = None,
) -> Any:
    """The YAML document in the UTF-8 file ``path``, with a key given twice in one mapping refused.

    Every way the file can fail to read (not found, a folder, unreadable, not UTF-8, a
    duplicate key, not valid YAML) raises ``error_type`` with a message that names the file,
    and ``what`` it should be; ``not_found_hint()`` is appended when the file does not exist.
    """
    where = str(path)
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)
    except FileNotFoundError:
        raise error_type(f"{where}: {what} not found{not_found_hint() if not_found_hint else ''}") from None
    except IsADirectoryError:
        raise error_type(f"{where}: is a folder; give the path of a YAML {what}") from None
    except OSError as e:
        raise error_type(f"{where}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error_type(f"{where}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except _DuplicateKey as e:
        raise error_type(
            f"{where}: line {e.line}: duplicate key '{e.key}' (first at line {e.first}); "
            "keep one, the later would silently win"
        ) from None
    except yaml.YAMLError as e:
        raise error_type(f"{where}: not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file (or shipped recipe name) and
    ``key=value`` overrides.

    Overrides use dotted keys (``shard.crf=28``) and YAML values (``shard.fps=null``).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = recipe_path(path)
        where = str(path)
        loaded = read_yaml(
            path,
            ConfigError,
            "config file",
            not_found_hint=lambda: (
                " (shipped recipes: "
                + ", ".join(sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml")))
                + ")"
            ),
        )
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    cfg = _build(Config, tree, prefix="", where=str(path) if path is not None else "<defaults>")
    _no_repeated_lists(overrides)
    for item in overrides:
        _apply_override(cfg, item)
    cfg.validate(str(path) if path is not None else "<command line>")
    return cfg


def config_from_dict(
    tree: dict[str, Any], where: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint), with
    ``key=value`` overrides applied, validating it."""
    cfg = _build(Config, _migrate(tree), prefix="", where=where)
    for item in overrides:
        _apply_override(cfg, item)
    cfg.validate(where)
    return cfg


def _migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config tree with the keys of MOVED under their new names."""
    tree = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in tree.items()}
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            to_section, to_key = new.split(".")
            tree.setdefault(to_section, {})[to_key] = tree[section].pop(key)
    return tree


def _moved(dotted: str) -> str:
    new = MOVED.get(dotted)
    return f" ({dotted} is now {new}: rename it)" if new else ""


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    label = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {label} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'{_moved(f'{prefix}{key}') or _suggest(key, fields)}"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", where)
    return cls(**kwargs)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", where=where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: {key} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads "1e-3" as a string; accept what Python reads as a number.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means infinity or NaN: they pass every "> 0" check and break later.
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {tp!r} of {key} is not supported")
    raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def _no_repeated_lists(overrides) -> None:
    """A list key given twice on one command line is almost always an unquoted brace pattern
    the shell expanded into one override per shard, of which only the last would count."""
    seen: dict[str, int] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        seen[key] = seen.get(key, 0) + 1
    for key, n in seen.items():
        if n > 1 and key in ("data.train", "data.eval"):
            raise ConfigError(
                f"command line: {key} given {n} times; the shell expands an unquoted brace pattern into one "
                f"argument per shard: quote it, e.g. '{key}=[shards/shard-{{000000..000009}}.tar]'"
            )


def _text_list(raw: str) -> list[str]:
    """``[a, b/{0..9}.tar]`` or a bare ``b/{0..9}.tar`` as a list of text; commas inside braces
    belong to the pattern (YAML reads ``{`` in a list as the start of a mapping)."""
    body = raw.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items, depth, start = [], 0, 0
    for n, c in enumerate(body + ","):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            items.append(body[start:n].strip().strip("'\""))
            start = n + 1
    return [item for item in items if item]


def _apply_override(cfg: Config, item: str) -> None:
    where = "command line"
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    node: Any = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is not a section, cannot set {dotted}")
        known = {f.name for f in dataclasses.fields(node)}
        if name not in known:
            prefix = ".".join(parts[:depth])
            raise ConfigError(
                f"{where}: unknown key '{dotted}'{_moved(dotted) or _suggest(name, known)}"
                + (f" in section '{prefix}'" if prefix else "")
            )
        if depth == len(parts) - 1:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            hint = typing.get_type_hints(type(node))[name]
            if hint is str and not isinstance(value, str):
                value = raw  # "prefix=001" stays the string the user typed
            if hint == list[str] and not isinstance(value, list):
                value = _text_list(raw)  # a brace pattern, or one path without brackets
            setattr(node, name, _coerce(hint, value, dotted, where))
        else:
            node = getattr(node, name)
