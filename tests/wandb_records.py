"""Read back what a W&B run wrote to its folder: the records of ``run-<id>.wandb`` (W&B's transaction log, a
LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs), so a test can check an offline run without a network."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every Record in a ``.wandb`` file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position: position + 7])
        if kind == 0 and length == 0:
            break
        pending += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class OfflineRun:
    """What an offline run folder (``wandb/offline-run-<time>-<id>``) holds, decoded."""

    folder: Path
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    @classmethod
    def read(cls, folder: Path, timeout: float = 30.0) -> OfflineRun:
        """The run's records once its log holds the exit record: W&B's service process may still be writing
        the log's last block when ``run.finish()`` returns."""
        deadline = time.monotonic() + timeout
        while True:
            out = cls._read(Path(folder))
            if out.exit_code is not None or time.monotonic() > deadline:
                return out
            time.sleep(0.2)

    @classmethod
    def _read(cls, folder: Path) -> OfflineRun:
        out = cls(folder)
        (log,) = out.folder.glob("run-*.wandb")
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out.run = record.run
                out.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                out.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                out.history.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item})
            elif kind == "summary":
                out.summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.summary.update})
            elif kind == "exit":
                out.exit_code = record.exit.exit_code
        return out

    def series(self, key: str) -> dict[int, Any]:
        """{step: value} of one logged key; a nested value (an image list's ``key/count``, ...) as a dict."""
        out = {}
        for row in self.history:
            nested = {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}
            if key in row or nested:
                out[row["_step"]] = row[key] if key in row else nested
        return out
