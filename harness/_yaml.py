"""Line-aware YAML loading for study specs.

Why not ``yaml.safe_load``: a user error must name the YAML line it comes from, and ``safe_load`` forgets
where each value was. Here the document is composed into nodes first, then converted to plain Python while
every value's location is recorded under its path (``("method", "ema", "beta")``). ``${VAR}`` and
``${VAR:-default}`` are expanded in string scalars on the way, and duplicate keys (which PyYAML silently
resolves to the last one) are refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import SpecError

__all__ = ["Located", "LocationMap", "load_yaml_with_lines"]

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Located:
    """Where a value was written: the file as the user named it and the 1-based line."""

    file: str
    line: int


@dataclass
class LocationMap:
    """Locations of the values of a (possibly merged) document, by path."""

    by_path: dict[Path_, Located] = field(default_factory=dict)
    default: Located | None = None

    def find(self, path: Path_) -> Located | None:
        """The location of ``path``, or of its closest ancestor that was written in a file."""
        path = tuple(path)
        while True:
            if path in self.by_path:
                return self.by_path[path]
            if not path:
                return self.default
            path = path[:-1]

    def update(self, other: LocationMap) -> None:
        self.by_path.update(other.by_path)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on a dot: ``1.0e-3``)."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))

_CONSTRUCTOR = _Loader("")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(text: str, where: Located, env: dict[str, str], path: Path_) -> str:
    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is not None:  # set but empty, and no default: the empty string, as in a shell
            return value
        raise SpecError(
            f"{where.file}:{where.line}: {_dotted(path) or '(top level)'}: environment variable {name} is not set "
            f"(set it, or write ${{{name}:-default}})"
        )

    return _ENV_RE.sub(repl, text)


def _scalar(node: yaml.ScalarNode, where: Located, env: dict[str, str], path: Path_ = ()) -> Any:
    value = _CONSTRUCTOR.construct_object(node, deep=True)
    if not isinstance(value, str) or "${" not in value:
        return value
    expanded = _interpolate(value, where, env, path)
    # A value that is one whole ${...} expression takes the YAML type of what it expands to
    # (`lr: ${LR:-2e-5}` is a float, `data_dir: ${UNISD_DATA_DIR:-}` unset is null), unless quoted.
    if node.style is None and _ENV_RE.fullmatch(value.strip()):
        if expanded.strip() == "":
            return None
        try:
            resolved = yaml.load(expanded, Loader=_Loader)
        except yaml.YAMLError:
            return expanded
        if isinstance(resolved, str | int | float | bool) or resolved is None:
            return resolved
    return expanded


def _convert(node: yaml.Node, path: Path_, file: str, locs: LocationMap, env: dict[str, str]) -> Any:
    where = Located(file, node.start_mark.line + 1)
    locs.by_path[path] = where
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, where, env) if isinstance(key_node, yaml.ScalarNode) else None
            key_where = Located(file, key_node.start_mark.line + 1)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise SpecError(
                    f"{file}:{key_where.line}: {_dotted(path) or '(top level)'}: keys must be names"
                )
            if key in out:
                raise SpecError(f"{file}:{key_where.line}: {_dotted((*path, key))}: key written twice")
            key = str(key)
            out[key] = _convert(value_node, (*path, key), file, locs, env)
            # The key's own line is the one a user looks for (a nested mapping starts a line below).
            locs.by_path[(*path, key)] = key_where
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), file, locs, env) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    return _scalar(node, where, env, path)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml_with_lines(
    path: Path, shown: str, env: dict[str, str] | None = None
) -> tuple[Any, LocationMap]:
    """Parse ``path`` into plain Python and the location of every value.

    ``shown`` is how errors name the file (the path as the user wrote it). Raises ``SpecError`` for a
    missing or unreadable file, a YAML syntax error (with its line), aliases to unknown anchors, an
    unset ``${VAR}`` and duplicate keys. An empty document returns ``None``.
    """
    env = dict(os.environ) if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{shown}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{shown}: is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{shown}: cannot read: {err}") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f"{mark.line + 1}" if mark is not None else "?"
        problem = err.problem or err.context or "invalid YAML"
        raise SpecError(f"{shown}:{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{shown}: YAML syntax error: {str(err).splitlines()[0]}") from None
    locs = LocationMap(default=Located(shown, 1))
    if node is None:
        return None, locs
    try:
        return _convert(node, (), shown, locs, env), locs
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        line = mark.line + 1 if mark is not None else 1
        raise SpecError(f"{shown}:{line}: YAML error: {err.problem}") from None
