"""Reading back what W&B wrote in offline mode, without any W&B server.

Since wandb 0.2x an offline run keeps everything in ``run-<id>.wandb``: a LevelDB-style log
(32 KiB blocks; each chunk has a 7-byte header: CRC32, little-endian length, type full /
first / middle / last) after a 7-byte file header (``:W&B``, a magic number, a version), whose
records are ``wandb_internal_pb2.Record`` protobufs. ``files/wandb-summary.json`` is only
written when a run is synced, so the tests read the log itself.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_runs(folder: Path, timeout_s: float = 60.0) -> list[Path]:
    """The transaction logs of every offline run under ``folder``, once each is complete.

    ``run.finish()`` returns before W&B's service process has written everything (it writes
    asynchronously; it is done when the process exits), so this waits for each log's ``exit``
    record.
    """
    logs = sorted(folder.rglob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    for path in logs:
        while not _has_exit(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} got no exit record within {timeout_s} s")
            time.sleep(0.1)
    return logs


def _has_exit(path: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in records(path))
    except (ValueError, struct.error, DecodeError):  # still being written
        return False


def records(path: Path) -> Iterator[Any]:
    """Every record of one run's transaction log, in order."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the writer pads a block's tail that cannot hold a header
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding
            pos += left_in_block
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield _parse(payload)
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            yield _parse(b"".join([*parts, payload]))
            parts = []


def _parse(payload: bytes) -> Any:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record


def _items(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key = ".".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json)
    return out


def summary(path: Path) -> dict[str, Any]:
    """The run's summary after every update (keys of nested values joined with dots)."""
    out: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            out.update(_items(record.summary.update))
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """Every logged history row, with its ``_step``."""
    return [_items(r.history.item) for r in records(path)
            if r.WhichOneof("record_type") == "history"]


def config(path: Path) -> dict[str, Any]:
    """The run's config as given to ``wandb.init`` (top-level keys; W&B wraps each value in
    ``{"value": ...}``, which is unwrapped here)."""
    out: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else \
            record.config.update if kind == "config" else ()
        for key, value in _items(items).items():
            out[key] = value["value"] if isinstance(value, dict) and "value" in value else value
    return out


def run_info(path: Path) -> Any:
    """The run record (``run_group``, ``tags``, ``display_name``, ``project``, ...)."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise ValueError(f"{path} holds no run record")
