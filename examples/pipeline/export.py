"""Exports a person can share: a trained segmenter as a folder in ``huggingface_hub``'s ``ModelHubMixin``
conventions, loadable without masksd's training state.

An export folder holds

- ``model.safetensors``: the bare segmenter's weights (``masksd.bare_state_dict``: no ``segmenter.`` prefix,
  no mask tokens), the keys of ``segmenter.state_dict()``;
- ``config.json``: the architecture (``architecture`` names an :data:`~examples.pipeline.factory.ARCHITECTURES`
  entry, beside that entry's settings as checkpoints store them), the inference protocol (input size, resize,
  restore, threshold), the run's TrainConfig, its evaluation and where its weights started;
- ``README.md``: a model card generated from config.json;
- ``processor/``: a CLIPSeg snapshot's tokenizer and image processor files, for CLIPSeg trained from one.

:class:`SegmenterExport` is the ``ModelHubMixin``: ``save_pretrained``, ``from_pretrained`` (a folder or a
Hub id) and ``push_to_hub``. Loading reads JSON and safetensors only (and, for CLIPSeg, the tokenizer's data
files through transformers without remote code): nothing in the folder runs, and a folder of another model
is refused by name. Needs ``masksd[hub]`` (huggingface_hub, safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
except ImportError as error:  # an optional extra: one line naming it
    raise ImportError("exports need huggingface_hub and safetensors: pip install 'masksd[hub]' (or pass --no-export)") from error

import masksd
from examples.pipeline.checkpoint import describe_model, load_checkpoint, load_weights
from examples.pipeline.config import TrainConfig
from examples.pipeline.factory import ARCHITECTURES, architecture_name, checkpoint_architecture, segmenter_from_entries, weights_follow

__all__ = ["SegmenterExport", "Exported", "checkpoint_export", "export_run", "save_export", "load_export", "model_card", "run_evaluation", "weights_origin",
           "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "PROCESSOR_DIR", "FORMAT"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PROCESSOR_DIR = "processor"
FORMAT = "masksd-export"
"""config.json's ``format``: what tells a masksd export from any other folder with a config.json."""
FORMAT_VERSION = 1
_HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{PROCESSOR_DIR}/*"]
"""What from_pretrained fetches of a Hub repository: data files only, never code."""


class SegmenterExport(
    nn.Module,
    ModelHubMixin,
    library_name="masksd",
    pipeline_tag="image-segmentation",
    tags=["referring-image-segmentation", "cm-masksd"],
):
    """A trained referring segmenter and what describes it (``config``: config.json's content), for sharing.

    ``SegmenterExport.from_pretrained(folder_or_hub_id)`` rebuilds the segmenter that config.json names (no
    pretrained download: the weights are in the folder) and loads ``model.safetensors``;
    ``export(images, tokens)`` is the segmenter's own forward, ``export.tokenize(texts)`` its tokenizer.
    ``save_pretrained(folder)`` writes the weights, config.json and a fresh model card;
    ``push_to_hub(repo_id)`` uploads the same files."""

    def __init__(self, segmenter: nn.Module, config: dict[str, Any]):
        super().__init__()
        if architecture_name(config) is None or config.get("architecture") != architecture_name(config):
            raise ValueError(f"config must name its architecture (one of {sorted(ARCHITECTURES)}) with that architecture's entry")
        self.segmenter = segmenter  # its train/eval mode left as it is: the trainer's model is exported in place
        self.export_config = dict(config)

    def forward(self, images: torch.Tensor, texts: Any) -> torch.Tensor:
        """The segmenter's logits (B, 1, h, w) for normalised (B, 3, S, S) images and ``tokenize``'d texts."""
        return self.segmenter(images, texts)

    def tokenize(self, texts: list[str]) -> Any:
        return self.segmenter.tokenize(texts)

    # --------------------------------------------------------------- ModelHubMixin
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        config = dict(self.export_config)
        state = {k: v.detach().contiguous().cpu() for k, v in self.segmenter.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "masksd"})
        config.update(_save_processor(self.segmenter, config, save_directory))
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (save_directory / CARD_NAME).unlink(missing_ok=True)  # save_pretrained writes a card only where none is

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return model_card(self.export_config, sum(p.numel() for p in self.segmenter.parameters()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False, token: str | bool | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False, revision: str | None = None,
                        **model_kwargs: Any) -> SegmenterExport:
        """The export in a local folder, or in a Hub repository (``owner/name``; only its data files are fetched)."""
        folder = _local_folder(str(pretrained_model_name_or_path), revision, cache_dir, force_download, local_files_only, token)
        _read_config(folder)  # refuse another model's folder before the mixin reads its config.json
        return super().from_pretrained(folder, **model_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str | torch.device = "cpu", **ignored: Any) -> SegmenterExport:
        folder = Path(model_id)  # from_pretrained fetched a Hub repository's files first
        config = _read_config(folder)
        entries = dict(config)
        if PROCESSOR_DIR == (config.get("clipseg_config") or {}).get("pretrained"):  # the export's own processor files
            entries["clipseg_config"] = {**config["clipseg_config"], "pretrained": str(folder / PROCESSOR_DIR)}
        if PROCESSOR_DIR == (config.get("lavt_processor") or {}).get("tokenizer"):  # LAVT's tokenizer, saved beside the weights
            entries["lavt_processor"] = {**config["lavt_processor"], "tokenizer": str(folder / PROCESSOR_DIR)}
        with weights_follow():
            segmenter, architecture = segmenter_from_entries(entries, f"export {folder}")
        load_weights(segmenter, {"model": _read_weights(folder), **architecture}, folder / WEIGHTS_NAME, architecture, "from_pretrained")
        return cls(segmenter.to(map_location).eval(), entries)  # processor/ as a path here: save_pretrained copies it from there


@dataclass
class Exported:
    """What :func:`load_export` gives the scripts: the segmenter in eval mode and the run's TrainConfig as a dict."""

    segmenter: nn.Module
    training: dict[str, Any]
    config: dict[str, Any]
    """config.json's content."""


def load_export(source: str | Path, device: torch.device | str = "cpu") -> Exported:
    """The segmenter of an export folder or a Hub id (``owner/name``), on ``device`` in eval mode."""
    export = SegmenterExport.from_pretrained(str(source), map_location=str(device))
    return Exported(export.segmenter, dict(export.export_config.get("training") or {}), export.export_config)


def export_config(segmenter: nn.Module, training: Mapping[str, Any], step: int, evaluation: Mapping[str, Any] | None) -> dict[str, Any]:
    """config.json of an export of ``segmenter`` trained by the run ``training`` (a TrainConfig as a dict) for ``step``
    optimiser steps, with its ``evaluation`` (the trainer's eval_<split>.json or evaluate.py's report; None: not evaluated)."""
    entries = checkpoint_architecture(segmenter)
    run = TrainConfig.from_dict(dict(training), source="")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "masksd_version": masksd.__version__,
        "architecture": architecture_name(entries),
        "description": describe_model(entries),
        **entries,
        "inference": {"image_size": segmenter.config.image_size, "resize": run.resize, "restore": run.restore,
                      "threshold": run.eval_threshold, "normalisation": "CLIP mean and std (masksd.data.CLIP_MEAN, CLIP_STD)"},
        "step": int(step),
        "training": dict(training),
        "evaluation": dict(evaluation) if evaluation else None,
        "weights": weights_origin(run),
    }


def export_run(segmenter: nn.Module, cfg: TrainConfig, step: int, folder: str | Path, evaluation: Mapping[str, Any] | None = None) -> Path:
    """Write the export of a training run's segmenter to ``folder`` (replacing a previous export there:
    the trainer's own ``<output>/export``), atomically; returns the folder."""
    export = SegmenterExport(segmenter, export_config(segmenter, asdict(cfg), step, evaluation))
    return _write_atomic(export, Path(folder))


def checkpoint_export(checkpoint: str | Path, evaluation: Mapping[str, Any] | None = None) -> SegmenterExport:
    """The export of a training checkpoint (``last.pt``, ``best.pt``); ``evaluation`` defaults to the run's
    ``eval_<split>.json`` beside the checkpoint when that evaluated the checkpoint's step."""
    from examples.pipeline.factory import load_segmenter

    checkpoint = Path(checkpoint)
    segmenter, run = load_segmenter(checkpoint)
    step = int(load_checkpoint(checkpoint)["step"])
    if evaluation is None:
        evaluation = run_evaluation(checkpoint.parent, run.get("eval_split", "val"), step)
    return SegmenterExport(segmenter, export_config(segmenter, run, step, evaluation))


def save_export(export: SegmenterExport, folder: str | Path, overwrite: bool = False) -> Path:
    """``export.save_pretrained(folder)``, atomically; refuses a non-empty ``folder`` unless ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"--output {folder} exists and is not an empty folder: pass --overwrite to replace it, or another folder")
    return _write_atomic(export, folder)


def run_evaluation(folder: Path, split: str, step: int) -> dict[str, Any] | None:
    """The trainer's final evaluation of ``split`` in run folder ``folder`` (eval_<split>.json) if it evaluated ``step``; else None."""
    path = folder / f"eval_{split}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("step") == step else None


def _write_atomic(export: SegmenterExport, folder: Path) -> Path:
    """save_pretrained into a temporary sibling folder, then swap it in: a reader never sees half an export."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        export.save_pretrained(staging)
        _default_permissions(staging)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _default_permissions(folder: Path) -> None:
    """mkdtemp's folder is private (0700), as is what safetensors writes: give the export the modes the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------- loading, refusing what is not ours
def _local_folder(model_id: str, revision: str | None, cache_dir: Any, force_download: bool, local_files_only: bool,
                  token: Any) -> Path:
    """The export's local folder: ``model_id`` itself, or a snapshot of the Hub repository's data files."""
    if os.path.isdir(model_id):
        return Path(model_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                      local_files_only=local_files_only, token=token, allow_patterns=_HUB_FILES))
    except HFValidationError as error:
        raise FileNotFoundError(f"{model_id} is neither an export folder nor a Hugging Face Hub id ({error})") from None
    except Exception as error:  # offline, no such repository, no access: huggingface_hub's many error types
        raise FileNotFoundError(f"{model_id} is not a local folder, and fetching it from the Hugging Face Hub failed: "
                                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def _read_config(folder: Path) -> dict[str, Any]:
    """config.json of a masksd export; any other folder is refused, naming what it holds."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:6]
        raise ValueError(f"{folder} is not a masksd export: no {CONFIG_NAME} (it holds {found}); export a checkpoint with examples/export.py")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not the object a masksd export writes")
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a masksd export: its {CONFIG_NAME} describes {_foreign(config)}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} is export format {config['format_version']}; this masksd reads up to {FORMAT_VERSION}: update masksd")
    name = config.get("architecture")
    if name not in ARCHITECTURES or ARCHITECTURES[name] not in config:
        raise ValueError(f"{folder} holds a masksd export of architecture {name!r}, which this checkout does not build "
                         f"(known: {sorted(ARCHITECTURES)}; a newer masksd?)")
    return config


def _foreign(config: dict[str, Any]) -> str:
    """In words, the model another library's config.json describes."""
    if config.get("architectures") or config.get("model_type"):  # transformers
        kind = ", ".join(config.get("architectures") or []) or config["model_type"]
        return f"a transformers model ({kind}); load it with transformers"
    if "model_cfg" in config or "architecture" in config and "pretrained_cfg" in config:  # timm / open_clip hub configs
        return f"a timm or open_clip model ({config.get('architecture', 'model_cfg')})"
    if "_class_name" in config:  # diffusers
        return f"a diffusers {config['_class_name']}"
    return f"no masksd model (format {config.get('format')!r}; keys {sorted(config)[:6]})"


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict; pickled weights (pytorch_model.bin) are never read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (pickled weights {others} are never loaded: they can run code)" if others else ""
        raise FileNotFoundError(f"export {folder} has no {WEIGHTS_NAME}{hint}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({path.stat().st_size} bytes): {error}") from None


def _save_processor(segmenter: nn.Module, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A CLIPSeg trained from a snapshot reads its tokenizer and normalisation from there: copy the snapshot's
    processor files into the export and point config.json at them. A LAVT trained from snapshots: save its tokenizer
    there and record its image statistics (``lavt_processor``), so the export needs no snapshot folder. Returns
    config.json's changed entries."""
    if "lavt_config" in config:
        return _save_lavt_processor(segmenter, config, folder)
    clipseg = config.get("clipseg_config") or {}
    source = clipseg.get("pretrained")
    if not source or source == PROCESSOR_DIR:
        if source == PROCESSOR_DIR and not (folder / PROCESSOR_DIR).is_dir():
            raise ValueError("clipseg_config.pretrained is the export's processor folder, which this export does not hold")
        return {}
    from masksd.integrations.hfclip import require_transformers

    processor = require_transformers().AutoProcessor.from_pretrained(source)
    processor.save_pretrained(str(folder / PROCESSOR_DIR))
    return {"clipseg_config": {**clipseg, "pretrained": PROCESSOR_DIR}}


def _save_lavt_processor(segmenter: nn.Module, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """LAVT's share of :func:`_save_processor`: nothing for the random tiny model (its vocabulary is built in code)."""
    lavt = config["lavt_config"]
    if lavt.get("pretrained") is None and "lavt_processor" not in config:
        return {}
    segmenter.tokenizer.save_pretrained(str(folder / PROCESSOR_DIR / "bert"))  # the snapshot's layout: load_tokenizer reads it
    processor = {"tokenizer": PROCESSOR_DIR, "mean": list(segmenter.renormalise.mean), "std": list(segmenter.renormalise.std)}
    return {"lavt_config": {**lavt, "pretrained": None}, "lavt_processor": processor}


# --------------------------------------------------------------- the model card
_LICENSES: dict[str | None, tuple[str | None, str]] = {
    None: (None, "random initialisation: no upstream weights"),
    "masksd-tiny-synthetic": ("mit", "the tiny CLIP that masksd pretrained on its synthetic scenes (examples/pretrain_clip.py), "
                                     "shipped with masksd under the MIT license"),
    "openai": ("mit", "OpenAI's CLIP weights, released under the MIT license (github.com/openai/CLIP); OpenAI's model "
                      "card calls deployed use out of scope"),
}
"""Where a run's weights started (TrainConfig.pretrained), with the license of those weights where known."""


def weights_origin(run: TrainConfig) -> dict[str, Any]:
    """``{"pretrained", "license", "note"}``: the weights a run started from and their license (None: unknown or none)."""
    if run.pretrained in _LICENSES:
        license, note = _LICENSES[run.pretrained]
    elif run.model == "clipseg":
        license, note = None, (f"a local CLIPSeg snapshot ({run.pretrained}): state the license of the weights it was "
                               f"saved from (CIDAS/clipseg-rd64-refined's model card names its own)")
    elif os.path.sep in str(run.pretrained) or str(run.pretrained).endswith((".pt", ".bin", ".safetensors")):
        license, note = None, f"a local checkpoint ({run.pretrained}): state the license of the weights it holds"
    else:
        license, note = None, f"the open_clip weights tagged {run.pretrained!r} for {run.model}: see open_clip's model list for their license"
    return {"pretrained": run.pretrained, "license": license, "note": note}


def model_card(config: dict[str, Any], parameters: int) -> ModelCard:
    """The README.md of an export: front matter for the Hub, then the architecture, the data, the training
    command, the evaluation table, where the weights started, how to load it and the masksd version."""
    run = TrainConfig.from_dict(dict(config.get("training") or {}), source="")
    weights, evaluation = config.get("weights") or {}, config.get("evaluation")
    data = {"synthetic": "synthetic referring scenes (masksd.data.synthetic)",
            "manifest": f"the manifest {run.manifest} (your own data)"}.get(run.dataset, f"{run.dataset} ({run.split_by})")
    card_data = ModelCardData(
        library_name="masksd", license=weights.get("license") or "other", pipeline_tag="image-segmentation",
        tags=sorted({"referring-image-segmentation", "cm-masksd", "model_hub_mixin", config["architecture"]}),
        datasets=None if run.dataset in ("synthetic", "manifest") else [run.dataset],
    )
    m = run.masksd_config()
    branches = [f"{name.upper()} K={b.top_k}, α={b.ratio}, λ={b.weight}" for name, b in (("lmvsd", m.lmvsd), ("vmlsd", m.vmlsd)) if b.enabled]
    lines = [
        f"# {config['description']}, trained {'with CM-MaskSD' if branches else 'without MaskSD (baseline)'}",
        "",
        f"A referring image segmentation model exported by masksd {config['masksd_version']} (export format "
        f"{config['format_version']}): `model.safetensors` holds the bare segmenter ({parameters:,} parameters), "
        f"`config.json` its architecture, the inference protocol and the run that trained it.",
        "",
        "## Architecture",
        "",
        f"- `{config['architecture']}`: {config['description']}, input {config['inference']['image_size']} px, "
        f"up to {run.max_words} text tokens with SOT and EOT",
        f"- inference: {config['inference']['resize']} resize to the input, sigmoid, `{config['inference']['restore']}` "
        f"restoration to the image size, threshold {config['inference']['threshold']}; the MaskSD branches are training-only",
        "",
        "## Data and training",
        "",
        f"- data: {data}, trained on `{run.train_split}`, evaluated on `{run.eval_split}`",
        f"- {config['step']} optimiser steps; MaskSD: {'; '.join(branches) if branches else 'off'}",
        f"- weights started from: {weights.get('note', 'not recorded')}; license of those weights: {weights.get('license') or 'unknown'}",
        "",
        "```bash",
        training_command(run),
        "```",
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(evaluation, run, config["step"]),
        "",
        "## Use",
        "",
        "In a checkout of masksd (the reference models live in its `examples/`), with `pip install -e \".[examples,hub]\"`:",
        "",
        "```python",
        "from examples.pipeline.export import SegmenterExport",
        "",
        'model = SegmenterExport.from_pretrained("THIS_FOLDER_OR_HUB_ID")  # reads config.json and model.safetensors only',
        'logits = model(images, model.tokenize(["the red circle on the left"]))  # images: (B, 3, S, S), CLIP-normalised',
        "```",
        "",
        "or `python examples/predict.py --checkpoint THIS_FOLDER --image photo.jpg --text \"...\"`, "
        "`python examples/evaluate.py --checkpoint THIS_FOLDER`, `python examples/app.py --model THIS_FOLDER`.",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _evaluation_lines(evaluation: Mapping[str, Any] | None, run: TrainConfig, step: int) -> list[str]:
    if not evaluation:
        return ["Not evaluated at this step: run `examples/evaluate.py --checkpoint THIS_FOLDER`."]
    from masksd.metrics import format_table

    keys = [k for k in ("mIoU", "oIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9") if k in evaluation]
    split = f"{evaluation.get('dataset', run.dataset)} {evaluation.get('split', run.eval_split)}, after {step} steps"
    lines = [format_table({split: {k: evaluation[k] for k in keys}}), ""]
    protocol = {k: evaluation.get(k) for k in ("threshold", "restore", "samples") if evaluation.get(k) is not None}
    lines.append("Protocol: " + ", ".join(f"{k} {v}" for k, v in protocol.items()) + ".")
    if (evaluation.get("untrained") or {}).get("mIoU") is not None:
        lines.append(f"Before training: {evaluation['untrained']['mIoU']:.2f} mIoU.")
    return lines


def training_command(run: TrainConfig) -> str:
    """The train_cris_masksd.py command line that gives ``run``'s settings: the nearest preset and the flags
    that differ from it (runtime settings such as the output folder left out)."""
    from examples.pipeline.cli import dataclass_to_args
    from examples.pipeline.config import PRESETS, preset, runtime_fields

    runtime = runtime_fields(TrainConfig)
    best = min(PRESETS, key=lambda name: (len(dataclass_to_args(run, preset(name), skip=runtime)), name != "demo"))
    flags = dataclass_to_args(run, preset(best), skip=runtime)
    return " ".join(["python examples/train_cris_masksd.py", *([f"--preset {best}"] if best != "demo" else []), *flags])
