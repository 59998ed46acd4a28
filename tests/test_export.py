"""Exports (examples/pipeline/export.py): the trainer's <output>/export loads with from_pretrained to the trained
model's exact eval output; evaluate.py, predict.py and examples/export.py take it; a Hub id fetches data files only;
loading never runs code from the folder and refuses another model's folder by name."""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from examples.pipeline.checkpoint import load_checkpoint  # noqa: E402
from examples.pipeline.config import TrainConfig  # noqa: E402
from examples.pipeline.evaluation import evaluate  # noqa: E402
from examples.pipeline.export import SegmenterExport, export_config, load_export, save_export  # noqa: E402
from examples.pipeline.factory import build_dataset, is_export_source, load_segmenter  # noqa: E402
from examples.pipeline.trainer import train  # noqa: E402
import masksd  # noqa: E402
from masksd import bare_state_dict  # noqa: E402
from masksd.data import collate  # noqa: E402


def tiny(output: Path, **overrides) -> TrainConfig:
    base = TrainConfig(synthetic_train_size=32, synthetic_eval_size=12, batch_size=8, epochs=2, warmup_epochs=0.5, workers=0,
                       log_every=1, progress=False, overlays=0, eval_guidance=False, output=str(output))
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    return out, train(tiny(out))


def inputs(segmenter, texts=("the red circle", "a small blue square on the left")):
    images = torch.randn(len(texts), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return images, segmenter.tokenize(list(texts))


def test_the_run_ends_with_an_export_that_from_pretrained_loads_to_an_identical_eval_output(run):
    out, result = run
    assert result.export == out / "export"
    assert sorted(p.name for p in result.export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    weights = load_file(result.export / "model.safetensors")
    assert weights.keys() == bare_state_dict(load_checkpoint(out / "last.pt")["model"]).keys()  # the bare segmenter
    assert not any("mask_token" in k or k.startswith("segmenter.") for k in weights)

    export = SegmenterExport.from_pretrained(result.export)
    cfg = tiny(out)
    loader = DataLoader(build_dataset(cfg, cfg.eval_split, train=False), batch_size=8, collate_fn=collate)
    metrics = evaluate(export.segmenter, loader, export.tokenize, torch.device("cpu"), cfg.eval_threshold, progress=False)
    assert metrics == result.metrics  # exactly: the same scenes, the same weights, the same code
    images, tokens = inputs(export.segmenter)
    with torch.no_grad():
        assert torch.equal(export(images, tokens), result.model.eval()(images, tokens))
    config = json.loads((result.export / "config.json").read_text())
    assert config["architecture"] == "cris" and config["step"] == result.steps == 8
    assert config["evaluation"]["mIoU"] == result.metrics["mIoU"] and config["training"] == asdict(cfg)
    assert config["weights"]["pretrained"] == "masksd-tiny-synthetic" and config["weights"]["license"] == "mit"


def test_the_model_card_says_what_the_model_is_how_it_was_trained_and_how_it_scores(run):
    out, result = run
    card = (result.export / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: masksd" in front and "license: mit" in front and "- referring-image-segmentation" in front
    assert "# CRIS variant 'tiny' (masksd-tiny, 64 px), trained with CM-MaskSD" in body
    assert "python examples/train_cris_masksd.py --epochs 2 --warmup-epochs 0.5 --batch-size 8 --synthetic-train-size 32" in body
    assert f"| {result.metrics['mIoU']:.2f} |" in body and "synthetic val, after 8 steps" in body
    assert "LMVSD K=0.5, α=0.25, λ=0.75; VMLSD K=0.5, α=0.1, λ=0.1" in body
    assert f"exported by masksd {masksd.__version__}" in body and "weights started from: the tiny CLIP that masksd pretrained" in body


def test_evaluate_and_predict_take_the_export_folder(run, tmp_path):
    from examples.evaluate import main as evaluate_main
    from examples.predict import main as predict_main

    out, result = run
    report = evaluate_main(["--checkpoint", str(result.export), "--workers", "0", "--no-progress", "--output", str(tmp_path / "e.json")])
    assert {k: report[k] for k in result.metrics} == result.metrics
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(image)
    masks = []
    for source in (result.export, out / "last.pt"):
        mask_path, _ = predict_main(["--checkpoint", str(source), "--image", str(image), "--text", "the red circle",
                                     "--output-dir", str(tmp_path / Path(source).name)])
        masks.append(np.asarray(Image.open(mask_path)))
    assert masks[0].shape == (40, 72) and np.array_equal(masks[0], masks[1])


def test_export_script_exports_a_checkpoint_and_refuses_to_replace_a_folder_unasked(run, tmp_path, capsys):
    from examples.export import main as export_main

    out, result = run
    folder = export_main(["--checkpoint", str(out / "last.pt"), "--output", str(tmp_path / "exp")])
    again = SegmenterExport.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["evaluation"]["mIoU"] == result.metrics["mIoU"]  # its step was evaluated
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), SegmenterExport.from_pretrained(result.export).state_dict().values()))
    with pytest.raises(FileExistsError, match="exp exists and is not an empty folder: pass --overwrite"):
        export_main(["--checkpoint", str(out / "last.pt"), "--output", str(folder)])
    export_main(["--checkpoint", str(out / "last.pt"), "--output", str(folder), "--overwrite"])
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(out / "last.pt")])  # nowhere to put it
    assert "pass --output DIR, --push-to-hub REPO_ID, or both" in capsys.readouterr().err


def test_push_to_hub_uploads_exactly_the_export_files(run, monkeypatch):
    import huggingface_hub.hub_mixin as hub_mixin

    out, result = run
    pushed = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            pushed["private"] = private
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            pushed["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            pushed["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    from examples.export import main as export_main

    url = export_main(["--checkpoint", str(result.export), "--push-to-hub", "someone/masksd-tiny", "--private"])
    assert url == "https://huggingface.co/someone/masksd-tiny/commit/abc" and pushed["private"] is True
    assert pushed["files"] == ["README.md", "config.json", "model.safetensors"]
    assert pushed["config"] == json.loads((result.export / "config.json").read_text())


def test_a_hub_id_fetches_data_files_only_and_a_failed_fetch_is_one_line(run, monkeypatch):
    import huggingface_hub

    out, result = run
    asked = {}

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(result.export)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert is_export_source("someone/masksd-tiny") and not is_export_source("runs/x/last.pt")
    segmenter, training = load_segmenter("someone/masksd-tiny")
    assert asked["repo_id"] == "someone/masksd-tiny" and training == asdict(tiny(out))
    assert not any(p.endswith((".py", ".bin", ".pt", "*")) and "/" not in p for p in asked["allow_patterns"])  # no code, no pickles

    def offline(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someone/masksd-tiny is not a local folder, and fetching it from the Hugging Face Hub failed: ConnectionError"):
        load_export("someone/masksd-tiny")


class _Marker:
    """Unpickling this writes a file: the proof that a pickle ran code."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pickle ran"))


def test_loading_never_runs_code_from_the_folder_and_refuses_what_is_not_a_masksd_export(run, tmp_path):
    import shutil

    out, result = run
    folder = tmp_path / "export"
    shutil.copytree(result.export, folder)
    marker = tmp_path / "ran"
    _Marker.path = str(marker)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Marker()}))
    (folder / "modeling_masksd.py").write_text(f"open({str(marker)!r}, 'w').write('module ran')\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_masksd.Model"}}))
    SegmenterExport.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors \(pickled weights \['pytorch_model.bin'\] are never loaded"):
        SegmenterExport.from_pretrained(folder)
    assert not marker.exists()

    refused = {
        json.dumps({"model_type": "clipseg", "architectures": ["CLIPSegForImageSegmentation"]}):
            "is not a masksd export: its config.json describes a transformers model \\(CLIPSegForImageSegmentation\\)",
        json.dumps({**config, "architecture": "unet", "unet_config": {}}): "masksd export of architecture 'unet', which this checkout does not build",
        json.dumps({**config, "format_version": 99}): "export format 99; this masksd reads up to 1",
        "[1, 2]": "holds a JSON list",
        "{not json": "is not JSON",
    }
    shutil.copy(result.export / "model.safetensors", folder)
    for text, message in refused.items():
        (folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            SegmenterExport.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="is not a masksd export: no config.json"):
        load_segmenter(folder)

    # another architecture's weights under this config: one error counting the tensors that do not fit
    (folder / "config.json").write_text(json.dumps({**config, "cris_config": {**config["cris_config"], "decoder_ffn": 32}}))
    with pytest.raises(ValueError, match=r"model.safetensors holds weights that do not fit the model it records.*of another shape"):
        SegmenterExport.from_pretrained(folder)
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"\d+ missing, 1 unexpected"):
        SegmenterExport.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        SegmenterExport.from_pretrained(folder)


def test_clipseg_exports_with_its_processor_and_loads_without_the_snapshot(tmp_path):
    import shutil

    from examples.clipseg import CLIPSegRIS, CLIPSegRISConfig
    from tests.hf_snapshot import write_clipseg_snapshot

    for pretrained in (None, write_clipseg_snapshot(tmp_path / "snapshot")):
        torch.manual_seed(0)
        segmenter = CLIPSegRIS(CLIPSegRISConfig(pretrained=None if pretrained is None else str(pretrained))).eval()
        run = TrainConfig(model="clipseg", pretrained=None if pretrained is None else str(pretrained))
        folder = save_export(SegmenterExport(segmenter, export_config(segmenter, asdict(run), 3, None)), tmp_path / f"export-{pretrained is None}")
        if pretrained is not None:
            shutil.rmtree(pretrained)  # the export holds what it needs: weights, architecture, tokenizer, normalisation
            assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (folder / "processor").iterdir()}
        loaded = SegmenterExport.from_pretrained(folder)
        images, tokens = inputs(segmenter)
        assert torch.equal(loaded.tokenize(["a red ball"])["input_ids"], segmenter.tokenize(["a red ball"])["input_ids"])
        with torch.no_grad():
            assert torch.equal(loaded(images, tokens), segmenter(images, tokens))
        again = save_export(loaded, tmp_path / f"again-{pretrained is None}")  # a loaded export saves again, processor and all
        with torch.no_grad():
            assert torch.equal(SegmenterExport.from_pretrained(again)(images, tokens), segmenter(images, tokens))
        card = (folder / "README.md").read_text()
        assert "license: other" in card and "Not evaluated at this step" in card
        assert ("random initialisation" if pretrained is None else "a local CLIPSeg snapshot") in card


def test_without_the_hub_extra_training_with_export_stops_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.delitem(sys.modules, "examples.pipeline.export", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'masksd\[hub\]' \(or pass --no-export\)"):
        train(tiny(tmp_path / "run"))
    assert not (tmp_path / "run" / "train_log.csv").exists()


@pytest.mark.parametrize("overrides", [
    {}, {"baseline": True, "lr": 1e-4}, {"model": "clipseg", "pretrained": None, "masksd.vmlsd.enabled": False},
    {"masksd.lmvsd.ratio": 0.5, "masksd.masking": False, "text_key": "sent", "deep_level": "projected"},
])
def test_the_cards_training_command_gives_back_the_runs_settings(overrides):
    import shlex

    from examples.pipeline.cli import flatten
    from examples.pipeline.config import preset, runtime_fields
    from examples.pipeline.export import training_command
    from examples.train_cris_masksd import parse_args

    for name in ("demo", "refcocog-vitb"):
        run = preset(name, **overrides)
        command = training_command(run)
        assert command.startswith("python examples/train_cris_masksd.py") and (name == "demo") == ("--preset" not in command)
        rebuilt = parse_args(shlex.split(command)[2:])
        runtime = runtime_fields(TrainConfig)
        assert {k: v for k, v in flatten(rebuilt).items() if k.split(".")[0] not in runtime} == \
               {k: v for k, v in flatten(run).items() if k.split(".")[0] not in runtime}


def test_overwriting_a_run_removes_its_export_with_its_checkpoints(tmp_path, capsys):
    from examples.pipeline.runfolder import prepare_run_folder

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"old")
    (tmp_path / "last.pt").write_bytes(b"old")
    with pytest.raises(ValueError, match="holds a run"):
        prepare_run_folder(tmp_path, None, overwrite=False)
    assert (tmp_path / "export").is_dir()
    prepare_run_folder(tmp_path, None, overwrite=True)
    assert not (tmp_path / "export").exists() and not (tmp_path / "last.pt").exists()
    assert "removed the previous run's last.pt, export/" in capsys.readouterr().out
