"""Reading a labels CSV (``image_id,label``) and joining it to predictions."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from hybridcls.errors import InputError

__all__ = ["read_labels"]

_ID_COLUMNS = ("image_id", "path", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "class", "class_name")


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """Map image id (the file name) to its true class.

    Accepts a header with one of ``image_id/path/file/filename/image`` and one
    of ``label/class/class_name``. Ids are reduced to the file name so that a
    predictions file with full paths joins on them.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            id_col = next((c for c in _ID_COLUMNS if c in header), None)
            label_col = next((c for c in _LABEL_COLUMNS if c in header), None)
            if id_col is None or label_col is None:
                raise InputError(
                    f"{path}: labels file needs an id column ({'/'.join(_ID_COLUMNS)}) and a label "
                    f"column ({'/'.join(_LABEL_COLUMNS)}); found {header}"
                )
            labels: dict[str, str] = {}
            for line_no, row in enumerate(reader, start=2):
                key = Path(row[id_col]).name
                if key in labels:
                    raise InputError(f"{path}:{line_no}: image {key!r} is listed twice")
                labels[key] = row[label_col].strip()
    except OSError as exc:
        raise InputError(f"{path}: cannot read labels file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: labels file is not UTF-8 text") from exc
    return labels
