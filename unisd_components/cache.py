"""On-disk caches for things generated once per dataset or example: embeddings, instructions, negatives.

Everything lives in a directory the caller chooses. A cache file is named by its ``kind`` and a hash of
its namespace (model id, dataset fingerprint, prompt version, ...), so changing any of them starts a new
file instead of reusing stale entries; the namespace is also written into the file for humans. Writes
are atomic (temp file + ``os.replace``) and merge with what is on disk, so two workers filling the same
cache lose at most duplicated work, never a corrupt file.

A cache entry that cannot be read (a truncated file after a full disk, a hand edit) is discarded with a
one-line warning naming the file and rebuilt, never an error that fails every later run:
:func:`read_json` and :func:`write_json_atomic` are the reader and writer for any JSON cache file.

Example::

    cache = JsonCache(cache_dir, "negatives", {"model": model_id, "version": NEGATIVE_VERSION})
    missing = [ex for ex in examples if cache.get(ex.id) is None]
    cache.update({ex.id: text for ex, text in zip(missing, generate(missing))})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "JsonCache",
    "cached_array",
    "dataset_fingerprint",
    "example_fingerprint",
    "namespace_hash",
    "read_json",
    "write_json_atomic",
]

_log = logging.getLogger(__name__)


def namespace_hash(namespace: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(namespace, sort_keys=True, default=str).encode()).hexdigest()[:16]


def example_fingerprint(example: Any) -> str:
    """Hash of what an example's cached artefacts depend on: id, prompt, demonstration, answer, choices."""
    payload = {
        "id": example.id,
        "messages": [dict(m) for m in example.messages],
        "demonstration": example.demonstration,
        "answer": getattr(example, "answer", ""),
        "choices": list(getattr(example, "choices", ())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dataset_fingerprint(examples: Iterable[Any]) -> str:
    """Order-sensitive hash of a list of examples (row i of a cached array belongs to example i)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example_fingerprint(example).encode())
    return digest.hexdigest()[:16]


def tensors_fingerprint(named_tensors: Iterable[tuple[str, Any]], salt: str = "") -> str:
    """A short hash of named tensors' values: a strided sample of up to 256 elements of each (cheap even
    for a 7B model), so caches keyed on it follow the weights."""
    import torch

    digest = hashlib.sha256(salt.encode())
    with torch.no_grad():
        for name, tensor in named_tensors:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def discard(path: Path, why: str) -> None:
    """Drop an unreadable cache file, saying so in one line; the caller rebuilds the entry."""
    _log.warning("cache file %s is unreadable (%s): discarded, it will be rebuilt", path, why)
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
    except OSError as err:  # cannot delete it: the next write replaces it atomically anyway
        _log.warning("cache file %s could not be removed: %s", path, err.strerror)


def read_json(path: str | Path, check: Callable[[Any], bool] | None = None) -> Any | None:
    """The JSON value in ``path``; None when there is no file, or when it is unreadable or fails
    ``check`` (then the file is discarded with a one-line warning)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            value = json.load(handle)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        discard(path, f"{type(err).__name__}: {err}")
        return None
    if check is not None and not check(value):
        discard(path, "unexpected content")
        return None
    return value


def write_json_atomic(path: str | Path, value: Any, **dump_kwargs: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of it."""
    _atomic_write(Path(path), lambda h: json.dump(value, h, **dump_kwargs), "w")


class JsonCache:
    """A ``str -> JSON value`` store in ``<directory>/<kind>-<hash(namespace)>.json``."""

    def __init__(self, directory: str | Path, kind: str, namespace: Mapping[str, Any]) -> None:
        self.namespace = {"kind": kind, **namespace}
        self.path = Path(directory) / f"{kind}-{namespace_hash(self.namespace)}.json"
        self._entries: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        data = read_json(self.path, check=lambda v: isinstance(v, dict) and isinstance(v.get("entries", {}), dict))
        return dict(data.get("entries", {})) if data is not None else {}

    def get(self, key: str) -> Any | None:
        return self._entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, entries: Mapping[str, Any]) -> None:
        """Add entries and write the file (merged with entries another process wrote meanwhile)."""
        merged = self._read()
        merged.update(self._entries)
        merged.update(entries)
        self._entries = merged
        payload = {"namespace": self.namespace, "entries": merged}
        _atomic_write(self.path, lambda h: json.dump(payload, h, indent=1, ensure_ascii=False), "w")


def cached_array(
    directory: str | Path, kind: str, namespace: Mapping[str, Any], compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, bool]:
    """Load ``<directory>/<kind>-<hash>.npy`` or compute and save it. Returns ``(array, was_cached)``."""
    full = {"kind": kind, **namespace}
    stem = f"{kind}-{namespace_hash(full)}"
    path = Path(directory) / f"{stem}.npy"
    if path.exists():
        try:
            return np.load(path), True
        except (OSError, ValueError, EOFError) as err:  # truncated or not an array: rebuild it
            discard(path, f"{type(err).__name__}: {err}")
    array = np.asarray(compute())
    _atomic_write(path, lambda h: np.save(h, array), "wb")
    meta = Path(directory) / f"{stem}.json"
    _atomic_write(
        meta, lambda h: json.dump({"namespace": full, "shape": list(array.shape)}, h, indent=1), "w"
    )
    return array, False
