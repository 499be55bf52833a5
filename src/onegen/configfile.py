"""Reading config files: the text side of `onegen.config`, turning YAML and command-line overrides into
the nested dicts that `TrainConfig.from_dict` builds from.

Guarantees: YAML uses 1.2 booleans (only true/false; `precision: no` stays the string "no"); a key given
twice in one mapping is an error naming file:line and the dotted key, never a silent replacement; malformed
YAML names file:line (or the override it came from); `apply_overrides` records which dotted keys the
command line set, so that errors about them name the override and their relative paths stay relative to
the current directory, while `_resolve_paths` resolves a file's own relative paths against its folder.
This module knows no config schema and imports nothing else of onegen but errors.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import OneGenError


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so `precision: no` stays the string
    "no" (YAML 1.1 also reads yes/no/on/off as booleans). A key given twice in one mapping is an error,
    not a silent replacement of the first (a second `train:` section would drop the first one's keys)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # an unhashable key: PyYAML's own error follows
                    first = seen.setdefault(key, key_node)
                    if first is not key_node:
                        raise _DuplicateKey(key_node, first)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key_node: yaml.Node, first: yaml.Node):
        super().__init__(None, None, f"duplicate key '{key_node.value}' (first at line {first.start_mark.line + 1}): "
                         "a key may appear once per mapping; merge the two into one", key_node.start_mark)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; malformed YAML and duplicate keys name file:line."""
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        if isinstance(e, _DuplicateKey):
            raise OneGenError(e.problem, file=str(path), line=line,
                              field=_key_path(yaml.compose(text, Loader=_Loader), mark)) from None
        raise OneGenError(f"malformed YAML: {getattr(e, 'problem', e)}", file=str(path), line=line) from None
    if not isinstance(data, dict):
        raise OneGenError("expected a mapping of sections at the top level", file=str(path))
    return data


def _key_path(node: yaml.Node | None, mark: yaml.Mark, prefix: str = "") -> str | None:
    """The dotted path of the mapping key that starts at `mark` (for errors), None if not found."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            here = f"{prefix}{key_node.value}"
            if key_node.start_mark.index == mark.index:
                return here
            found = _key_path(value_node, mark, f"{here}.")
            if found:
                return found
    return None


class _Overridden(dict):
    """Config data with the dotted keys the command line set (`overridden`), so that path resolution
    leaves their paths relative to the current directory and errors name the override."""

    overridden: tuple[str, ...] = ()


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `["--a.b", "value", ...]` or `["a.b=value"]` overrides; values are parsed as YAML.

    Relative paths in them stay relative to the current directory (a YAML file's own paths are resolved
    against its folder); errors about their values name the override."""
    items = _split_overrides(overrides)
    out = _Overridden(data)
    out.overridden = (*getattr(data, "overridden", ()), *(key for key, _ in items))
    for key, text in items:
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise OneGenError(f"the command-line override --{key} has malformed YAML {text!r}: "
                              f"{getattr(e, 'problem', None) or e}", field=key) from None
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def _split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """`["--a.b", "v", "c.d=w"]` -> `[("a.b", "v"), ("c.d", "w")]`."""
    items: list[tuple[str, str]] = []
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        key = tok[2:] if tok.startswith("--") else tok
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(overrides):
            value = overrides[i + 1]
            i += 2
        else:
            raise OneGenError(f"override '{tok}' has no value (use --section.key VALUE)")
        if not all(key.split(".")):
            raise OneGenError(f"override '{tok}' names no config key (use --section.key VALUE)")
        items.append((key, value))
    return items


def keys_related(key: str, field_name: str | None) -> bool:
    """Whether dotted keys `key` and `field_name` are the same or one holds the other."""
    return field_name is not None and (key == field_name or key.startswith(f"{field_name}.")
                                       or field_name.startswith(f"{key}."))


_PATH_KEYS = ("data.train", "data.corpus", "data.eval", "model.name_or_path", "tokenizer.name_or_path",
              "output_dir")
_INPUT_ONLY = ("model.name_or_path", "tokenizer.name_or_path")  # a hub id when no such path exists


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative paths written in a config file against its folder `base`.

    `output_dir` always; input files the folder first (README): kept as given (relative to the current
    directory) only when they are not in the folder but are there; model and tokenizer paths only when
    they are in the folder (else they may be hub ids). Keys set by command-line overrides are left as
    given: relative to the current directory."""
    overridden = getattr(data, "overridden", ())
    for dotted in _PATH_KEYS:
        if any(keys_related(k, dotted) for k in overridden):
            continue
        *parents, leaf = dotted.split(".")
        node: Any = data
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), str):
            continue
        value = Path(node[leaf])
        if value.is_absolute() or not node[leaf]:
            continue
        in_folder = (base / value).exists()
        if dotted == "output_dir" or in_folder or (dotted not in _INPUT_ONLY and not value.exists()):
            node[leaf] = str(base / value)
    return data
