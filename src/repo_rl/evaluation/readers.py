"""Reading benchmark rows: JSONL, JSON, Parquet and ``datasets`` names through
:func:`repo_rl.data.iter_rows` (the training loader), plus CSV/TSV (GPQA) and ``NAME:CONFIG``
hub names here. Every row comes with ``where``, the ``file:line`` style name errors use.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from ..data import DataError, iter_rows
from ..errors import UserError

__all__ = ["read_csv", "read_hf_config", "read_rows"]


def read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """``(path:line, row)`` of a CSV (or ``.tsv``) file with a header row."""
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            for row in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: invalid CSV ({e})") from None


def read_hf_config(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of the ``datasets`` name ``NAME:CONFIG``."""
    name, config = source.split(":", 1)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataError(f"{source}: not a readable file or datasets name ({type(e).__name__}: {first})") from None
    for i, row in enumerate(ds):
        yield f"{source}[{split}][{i}]", row


def read_rows(source: str, split: str = "test") -> list[tuple[str, Any]]:
    """``(where, row)`` pairs of a file or ``datasets`` name (``NAME:CONFIG`` picks a config)."""
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            if not path.is_file():
                raise DataError(f"{source}: file not found")
            rows = list(read_csv(path))
        elif ":" in source and not path.exists() and not source.startswith("toyworld:") and "/" in source.split(":", 1)[0]:
            rows = list(read_hf_config(source, split))
        else:
            rows = list(iter_rows(str(path) if path.exists() else source, split))
    except DataError as e:
        raise UserError(str(e)) from None
    for _, row in rows:
        if isinstance(row, DataError):
            raise UserError(str(row))
    return rows
