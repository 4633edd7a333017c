"""Where benchmark files come from: a local folder (argument, then ``UNISD_DATA_DIR``) or the hub.

Every loader goes through these helpers so that a missing dataset always produces the same one-line
:class:`DataNotFoundError`, naming both ways to provide the data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from harness.data.errors import DataFormatError, DataNotFoundError

__all__ = [
    "ENV_VAR",
    "hub_load",
    "local_file",
    "read_json",
    "read_jsonl",
    "resolve_data_dir",
    "stable_hash",
    "in_validation_carve",
]

ENV_VAR = "UNISD_DATA_DIR"
_HOW_LOCAL = (
    f"set spec data.data_dir or {ENV_VAR} to a folder holding <benchmark>/ as laid out in shared/data"
)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data root: the argument, else ``$UNISD_DATA_DIR``, else None (meaning: the hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "")
    return Path(env).expanduser() if env else None


def local_file(folder: Path, benchmark: str, *names: str, hub: str | None) -> Path:
    """The first of ``names`` that exists in ``folder``; otherwise a DataNotFoundError naming both ways."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    missing = folder / names[0] if folder.is_dir() else folder
    hub_way = (
        f"or unset both to load {hub} from the Hugging Face hub (needs hub access)"
        if hub
        else f"(no Hugging Face hub dataset exists for {benchmark}, so local files are the only way)"
    )
    raise DataNotFoundError(
        f"{benchmark} data not found: {missing} does not exist. Put {' or '.join(names)} in "
        f"<data_dir>/{benchmark}/ and set spec data.data_dir or {ENV_VAR} to <data_dir>, {hub_way}."
    )


def hub_load(benchmark: str, hub_id: str, config: str | None, split: str) -> Any:
    """``datasets.load_dataset(hub_id, config, split=split)``; any failure becomes a DataNotFoundError."""
    try:
        import datasets

        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, gated, renamed: the user needs the same advice for all of them
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        name = f"{hub_id} ({config})" if config else hub_id
        raise DataNotFoundError(
            f"could not load {benchmark} from the Hugging Face hub, {name}: {reason}. Give hub access "
            f"(network; a token for gated sets), or {_HOW_LOCAL.replace('<benchmark>', benchmark)}."
        ) from err


def read_json(path: Path) -> Any:
    """A JSON file; a corrupt one is a DataFormatError naming the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise DataFormatError(f"{path}: cannot be read as JSON ({err})") from None


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file (gzip when it ends in .gz); a corrupt line is a DataFormatError naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFormatError(
                        f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})"
                    ) from None
    except (OSError, EOFError, UnicodeDecodeError) as err:  # a truncated .gz, bytes that are not UTF-8
        raise DataFormatError(f"{path}: cannot be read ({err})") from None
    return rows


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and Python version (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_validation_carve(source_id: str, fraction_percent: int = 10) -> bool:
    """Whether a training item belongs to the validation slice carved from a train split.

    Decided by a hash of the item's own id, so the carve does not depend on file order or on which
    other items exist (the hub copy and a local copy carve the same ids).
    """
    return stable_hash(f"validation-carve:{source_id}") % 100 < fraction_percent
