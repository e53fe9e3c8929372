"""Load MMEdit-format annotation files (MMEdit E-VQA/E-IC, VLKEB) into typed EditRecords.

Validation is strict and stops at the first bad record: a run that silently skips or
mis-reads rows would report metrics over a different benchmark than the one named.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from mmke.data.record import EditRecord, LazyImage
from mmke.errors import ConfigError, DataError

TEXT_FIELDS = ("src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
REQUIRED_FIELDS = TEXT_FIELDS + IMAGE_FIELDS
# Optional fields beyond the schema, checked when present and kept in ``EditRecord.extras``:
# the mini world's DE-VQA locality sets (texts, and one picture resolved like IMAGE_FIELDS) and
# VLKEB's one-hop portability list.
OPTIONAL_TEXT_FIELDS = ("loc_same_image_q", "loc_same_image_a", "loc_similar_image_a")
OPTIONAL_IMAGE_FIELDS = ("loc_similar_image",)
PORT_FIELD = "port_new"
PORT_REQUIRED = ("port_q", "port_a")
PORT_OPTIONAL = ("port_edit_q", "port_edit_a")
TASKS = ("vqa", "caption")

_FILE_HINT = ("set data.annotation_dir to the folder holding the annotation JSON files "
              "(it usually sits under data.root), and check data.train_file / data.eval_file")
_IMAGE_HINT = ("set data.root (or data.image_root) to the folder with the images: for MMEdit COCO "
               "val2014 and val2014_image_rephrase, for VLKEB VLKEB_images")


def _read_json(path: Path) -> Any:
    """Parse the file, turning OS and syntax errors into DataErrors that say where."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "annotation file not found"
        raise DataError(what, file=str(path), hint=_FILE_HINT)
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                        file=str(path),
                        hint="the file is truncated or corrupted; download it again") from e
    except UnicodeDecodeError as e:  # json.loads(bytes) decodes first; not a JSONDecodeError
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}", file=str(path),
                        hint="the file is not a JSON annotation file; download it again") from e


def _check_string(value: Any, path: Path, index: int, name: str, hint: str | None = None) -> None:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} ({value!r:.60})",
                        file=str(path), index=index, field=name,
                        hint=hint or "fix the record in the annotation file")
    if not value.strip():
        raise DataError("empty or whitespace-only string", file=str(path), index=index,
                        field=name, hint=hint or "fix the record in the annotation file or drop it")


def _check_port(value: Any, path: Path, index: int) -> None:
    """VLKEB's ``port_new``: a list of objects with non-empty ``port_q`` and ``port_a`` (and, in
    the released one-hop file, the second edit ``port_edit_q``/``port_edit_a``)."""
    hint = (f"'{PORT_FIELD}' must be a list of objects with non-empty string fields "
            f"{', '.join(PORT_REQUIRED)} (optionally {', '.join(PORT_OPTIONAL)})")
    if not isinstance(value, list):
        raise DataError(f"expected a list, got {type(value).__name__}", file=str(path),
                        index=index, field=PORT_FIELD, hint=hint)
    for j, item in enumerate(value):
        where = f"{PORT_FIELD}[{j}]"
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, got {type(item).__name__}", file=str(path),
                            index=index, field=where, hint=hint)
        for name in PORT_REQUIRED:
            if name not in item:
                raise DataError("required field missing", file=str(path), index=index,
                                field=f"{where}.{name}", hint=hint)
        for name in (*PORT_REQUIRED, *PORT_OPTIONAL):
            if name in item:
                _check_string(item[name], path, index, f"{where}.{name}", hint)


def _check_record(row: Any, path: Path, index: int) -> None:
    """Raise on the first problem with one row, naming its field."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", file=str(path),
                        index=index, hint="each record must be an object with the MMEdit fields")
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise DataError("required field missing", file=str(path), index=index, field=name,
                            hint=f"every record needs the fields {', '.join(REQUIRED_FIELDS)}")
        _check_string(row[name], path, index, name)
    for name in OPTIONAL_TEXT_FIELDS + OPTIONAL_IMAGE_FIELDS:
        if name in row:
            _check_string(row[name], path, index, name)
    if PORT_FIELD in row:
        _check_port(row[PORT_FIELD], path, index)


def load_mmedit(path: Path | str, image_root: Path | str, task: Literal["vqa", "caption"],
                limit: int | None = None) -> list[EditRecord]:
    """Read one MMEdit-format JSON list; ``limit`` keeps (and validates) only the first N rows.

    Images are not opened here, only resolved under ``image_root``; see ``check_images``.
    Fields beyond the MMEdit schema (e.g. VLKEB's ``port_new``) are kept in ``extras``; those of
    OPTIONAL_IMAGE_FIELDS become LazyImages there, resolved like the schema's images.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown MMEdit task {task!r}; expected one of {', '.join(TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path, image_root = Path(path), Path(image_root)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records at the top level, got "
                        f"{type(data).__name__}", file=str(path),
                        hint="point data.annotation_dir / the file settings at an MMEdit-format file")
    rows = data if limit is None else data[:limit]
    records = []
    for i, row in enumerate(rows):
        _check_record(row, path, i)
        # The source string lets a later LazyImage.load failure point back at this row.
        images = {name: LazyImage(image_root / row[name],
                                  source=f"file {path}, record {i}, field '{name}'")
                  for name in (*IMAGE_FIELDS, *OPTIONAL_IMAGE_FIELDS) if name in row}
        records.append(EditRecord(
            **{name: row[name] for name in TEXT_FIELDS},
            **{name: images[name] for name in IMAGE_FIELDS},
            task=task,
            uid=f"{path.stem}:{i}",
            extras={k: images.get(k, v) for k, v in row.items() if k not in REQUIRED_FIELDS},
        ))
    return records


def check_images(records: Sequence[EditRecord]) -> None:
    """Fail early, with one error, if any image of ``records`` is missing on disk.

    Checked before a run so a missing image folder surfaces in seconds, not mid-evaluation.
    """
    seen: dict[Path, bool] = {}  # many records share an m_loc image: stat each path once
    missing: list[tuple[str, str, Path]] = []
    for rec in records:
        lazy = [(name, getattr(rec, name)) for name in IMAGE_FIELDS]
        lazy += [(name, rec.extras[name]) for name in OPTIONAL_IMAGE_FIELDS if name in rec.extras]
        for name, image in lazy:
            p = image.path
            if p not in seen:
                seen[p] = p.is_file()
                if not seen[p]:
                    missing.append((rec.uid, name, p))
    if missing:
        lines = "\n".join(f"    {uid} field '{name}': {p}" for uid, name, p in missing[:5])
        more = f"\n    ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image file(s) missing (of {len(seen)} referenced), "
                        f"first {min(5, len(missing))}:\n{lines}{more}", hint=_IMAGE_HINT)
