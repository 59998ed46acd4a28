"""Checkpoints: atomic writes (a full disk named in one line, the temporary files of an interrupted write
removed at the next start), ``weights_only`` loads, weights checked against the model they load into (and
refused when non-finite), and the RNG states an exact resume needs."""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from examples.cris.config import VARIANTS
from examples.pipeline.guard import check_finite_weights

__all__ = [
    "save_atomic", "remove_stale_temporaries", "load_checkpoint", "load_weights", "describe_model", "rng_state",
    "set_rng_state", "latest_checkpoint",
]

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
"""The name of save_atomic's temporary file for ``<name>``: ``tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")``."""
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``:
    a reader never sees a half-written checkpoint, even if the writer is killed. A full disk (or quota)
    raises one OSError naming the folder and the space the file needs; ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        needed = _nbytes(obj)
        if isinstance(error, (OSError, RuntimeError)) and _disk_full(error, path.parent, needed):
            raise _disk_full_error(path, needed) from error
        raise
    return path


def _disk_full(error: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC, EDQUOT or EFBIG, or torch's zip writer's RuntimeError
    (which carries no errno) with less space free than the file needs."""
    if isinstance(error, OSError):
        return error.errno in _DISK_FULL
    try:
        return shutil.disk_usage(folder).free < needed
    except OSError:
        return False


def _disk_full_error(path: Path, needed: int) -> OSError:
    free = shutil.disk_usage(path.parent).free
    previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was there before"
    error = OSError(
        f"no space left in {path.parent} to write {path.name}: it needs about {_megabytes(needed)} and "
        f"{_megabytes(free)} are free (after removing the partial file); {previous}"
    )
    error.errno = errno.ENOSPC
    return error


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _nbytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about what torch.save writes."""
    if torch.is_tensor(obj):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`save_atomic` calls killed mid-write left in ``folder``; returns
    them. Call it when no process writes there (a run's start, before its first checkpoint)."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.tmp") if _TEMPORARY.fullmatch(p.name) and p.is_file()) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors, numbers, strings, containers only)."""
    path = Path(path)
    if path.is_dir():
        inside = [p.name for p in (path / "last.pt", path / "best.pt") if p.is_file()]
        if (path / "export" / "config.json").is_file():
            inside.append("export/")
        hint = f" (it holds {' and '.join(inside)}: pass one of them)" if inside else ""
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # torch's advice to load with weights_only=False is not ours
            raise ValueError(
                f"checkpoint {path} holds Python objects that weights_only=True refuses (not a masksd checkpoint, "
                f"or one written by other code): {_refused_global(error)}"
            ) from error
        raise ValueError(f"checkpoint {path} ({path.stat().st_size} bytes) is not a file torch.save wrote") from error
    except (RuntimeError, EOFError, KeyError, OSError, zipfile.BadZipFile) as error:  # a truncated zip, another format
        if isinstance(error, RuntimeError) and not any(m in str(error) for m in ("PytorchStreamReader", "zip archive", "central directory")):
            raise  # a device or version error, not the file's
        raise ValueError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or not a file torch.save wrote "
            f"(a partial download or copy?)" + (f": {str(error).split('. ')[0]}" if isinstance(error, RuntimeError) else "")
        ) from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a masksd training checkpoint (no 'model' entry)")
    return checkpoint


def describe_model(entries: Mapping[str, Any]) -> str:
    """In words, the model that a checkpoint's entries (or the ones a run would write) describe: its
    ``family`` (the class the training loop trained, e.g. MaskSD or CLIPPretrainer) and its architecture
    (``cris_config`` with the name of the :data:`~examples.cris.config.VARIANTS` entry it is, if any;
    ``clipseg_config``; ``lavt_config``; else the ``config``'s ``model`` and ``image_size``)."""
    family = entries.get("family")
    cris = entries.get("cris_config") or {}
    config = entries.get("config") or {}
    if cris:
        variant = next((f"variant {name!r} " for name, fields in VARIANTS.items()
                        if all(cris.get(k) == v for k, v in fields.items() if k != "pretrained")), "")
        segmenter = f"CRIS {variant}({cris.get('model_name')}, {cris.get('image_size')} px)"
        return f"{family} around {segmenter}" if family else segmenter
    for key, name in (("clipseg_config", "CLIPSeg"), ("lavt_config", "LAVT")):
        transformers_based = entries.get(key) or {}
        if transformers_based:
            segmenter = f"{name} ({transformers_based.get('pretrained') or 'random tiny'}, {transformers_based.get('image_size')} px)"
            return f"{family} around {segmenter}" if family else segmenter
    if isinstance(config, Mapping) and "model" in config:
        segmenter = f"{config['model']} at {config.get('image_size')} px"
        return f"{family} ({segmenter})" if family else f"a model of {segmenter}"
    return f"{family} (architecture not recorded)" if family else "a model whose family and architecture are not recorded"


def load_weights(module: nn.Module, checkpoint: Mapping[str, Any], path: str | Path, expected: Mapping[str, Any], purpose: str) -> None:
    """``module.load_state_dict(checkpoint["model"])``, unless the checkpoint holds another model: another
    ``family`` than ``expected``'s (the entries the loader would write itself, see :func:`describe_model`),
    or tensors ``module`` lacks, lacks itself, or holds at another shape. Then one ValueError names the
    file, both models (for ``purpose``, e.g. "--resume") and how many tensors do not match, with a few of
    them, instead of load_state_dict's list of every key. Weights holding NaN or ±inf (a run that diverged)
    are refused by name too (:class:`~examples.pipeline.guard.TrainingDiverged`, a ValueError)."""
    state, own = checkpoint["model"], module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    families = checkpoint.get("family"), expected.get("family")
    if not (missing or unexpected or reshaped) and (None in families or families[0] == families[1]):
        check_finite_weights(state, f"checkpoint {path}")
        module.load_state_dict(state)
        return
    examples = [f"{k} (missing)" for k in missing[:2]] + [f"{k} (unexpected)" for k in unexpected[:2]] + [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} in the file, {tuple(own[k].shape)} here" for k in reshaped[:2]]
    found, wanted = describe_model(checkpoint), describe_model(expected)
    models = (f"holds weights that do not fit the model it records, {found}" if found == wanted
              else f"holds {found}, but {purpose} needs {wanted}")
    raise ValueError(
        f"checkpoint {path} {models}: "
        f"{len(missing) + len(unexpected) + len(reshaped)} of {len(own.keys() | state.keys())} tensors do not match "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape"
        + (f"; e.g. {', '.join(examples)})" if examples else ")")
    )


def _refused_global(error: BaseException) -> str:
    """The line of torch's weights_only refusal that names what it refused ("Unsupported global: ...")."""
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported" in line or "global" in line.lower()]
    return lines[0][:200] if lines else str(error).splitlines()[0][:200]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The ``last.pt`` of a run folder if it exists."""
    path = Path(folder) / "last.pt"
    return path if path.is_file() else None


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a training step draws from, as weights_only-loadable values."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)


def _python_state() -> tuple:
    version, internal, gauss_next = random.getstate()
    return (version, torch.tensor(internal, dtype=torch.int64), gauss_next)
