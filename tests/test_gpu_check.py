"""The GPU check (benchmarks/gpu_check, one module per section) and the step profiler it shares, on CPU stand-ins:
every section's code path runs here, so the check cannot rot before a GPU is at hand. Nothing is timed."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

import masksd.wrapper
from benchmarks.gpu_check import check as gpu_check
from benchmarks.gpu_check import model_step, section, sync_debug
from benchmarks.gpu_check.plan import Plan
from benchmarks.step_profile import HEAD_PARTS, SEGMENTER_PARTS, labelled_parts, profile_step
from benchmarks.train_step import Bench
from examples.pipeline.config import preset
from masksd import MaskSDConfig

CPU = torch.device("cpu")


def test_gpu_check_tiny_runs_every_section(tmp_path):
    """The whole GPU check on the CPU (tiny model, gloo, dynamo's eager backend): every section reports numbers."""
    assert gpu_check.main(["--device", "cpu", "--tiny", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name in ("vit_b16", "vit_l14"):
        assert sections[name]["status"] == "ok", sections[name]["error"]
        figures = sections[name]["figures"]
        assert figures["batch"] == 4 and figures["oom"] == {} and figures["quick_gelu"] is False
        assert {"baseline", "CM-MaskSD", "CM-MaskSD, checkpointed"} == set(figures["variants"])
        for v in figures["variants"].values():
            assert v["median_s"] > 0 and v["images_per_s"] > 0 and v["flops"] > 0 and v["achieved_tflops"] > 0
            assert v["mfu"] is None and v["peak_allocated_bytes"] is None  # CPU: no bf16 peak, no allocator stats
        variants = figures["variants"]
        assert variants["CM-MaskSD"]["flops"] > 2 * variants["baseline"]["flops"]
    run = sections["torchrun"]
    assert run["status"] == "ok", run["error"]
    f = run["figures"]
    assert f["backend"] == "gloo" and f["in_group"] and f["world_size"] == 1 and f["ddp_wrapped"] == 1
    assert f["steps"] == 3 and f["train_images_per_s"] > 0 and f["eval_images_per_s"] > 0 and f["eval_samples"] == 8
    assert f["losses_finite"]
    compiled = sections["compile"]
    assert compiled["status"] == "ok", compiled["error"]
    c = compiled["figures"]
    assert c["backend"] == "eager" and c["scope"] == "step" and c["first_step_s"] > 0 and c["speedup"] > 0
    # the whole MaskSD step compiles in pieces: dynamo cannot trace the masking's draw from a torch.Generator
    assert c["graph_breaks"] == sum(c["graph_break_sites"].values()) > 0
    assert all(site.startswith("masksd/masking.py:") for site in c["graph_break_sites"])
    assert sections["sync_debug"]["status"] == "not applicable" and "CUDA" in sections["sync_debug"]["figures"]["reason"]
    assert sections["checkpoint_branches"]["status"] == "ok"
    profiled = sections["profile"]
    assert profiled["status"] == "ok", profiled["error"]
    for name, p in profiled["figures"]["variants"].items():
        assert p["clock"] == "cpu" and p["steps"] == 1 and len(p["top"]) == 15
        assert {"image encoder", "text encoder", "neck", "decoder", "projector", "backward", "optimizer step"} <= set(p["parts_ms"])
        assert {"image encoder", "decoder", "projector"} <= set(p["backward_ms"])
        assert 0.5 * p["wall_ms"] < p["total_ms"] < 1.5 * p["wall_ms"]  # the parts account for the step
    assert "masking" in profiled["figures"]["variants"]["CM-MaskSD"]["parts_ms"]
    assert list(profiled["figures"]["variants"]) == ["baseline", "CM-MaskSD", "baseline, fast head"]  # demo: reference head
    assert "torchrun --standalone --nproc_per_node=1" in data["commands"]["torchrun"]
    assert "benchmarks.gpu_check" in data["commands"]["check"]
    text = (tmp_path / "gpu_check_tiny.md").read_text()
    assert "| 3. One-process torchrun" in text and "| 7. Where the step's time goes" in text and "Machine:" in text


def test_step_profile_labels_every_part_and_puts_the_model_back():
    """The profiler's parts cover the step (CPU stand-in of the GPU profile), and the labels leave nothing behind."""
    cfg = preset("demo", pretrained=None)
    torch.manual_seed(0)
    bench = Bench(cfg, 4, CPU, {"CM-MaskSD": MaskSDConfig()})
    model = bench.models["CM-MaskSD"]
    segmenter, loss = model.segmenter, masksd.wrapper.segmentation_loss
    profile = profile_step(lambda: bench.run("CM-MaskSD"), model, CPU, steps=1, warmup=1, top=5)
    expected = {"embeddings", "image encoder", "text encoder", *HEAD_PARTS, "masking", "losses", "backward", "optimizer step"}
    assert expected <= set(profile.parts_ms) and all(v > 0 for v in profile.parts_ms.values())
    # each part's backward is timed apart, through the sequence numbers its forward operators recorded
    assert {"image encoder", "text encoder", *HEAD_PARTS, "losses"} <= set(profile.backward_ms)
    assert sum(profile.backward_ms.values()) > profile.parts_ms["backward"]  # most of the backward has a part
    assert profile.steps == 1 and len(profile.top) == 5 and profile.top[0]["ms"] >= profile.top[-1]["ms"]
    assert not set(SEGMENTER_PARTS) & set(vars(segmenter)) and "forward" not in vars(segmenter.decode_head.projector)
    assert masksd.wrapper.segmentation_loss is loss
    with labelled_parts(model):
        assert "encode_image" in vars(segmenter)
    with pytest.raises(ValueError, match="steps"):
        profile_step(lambda: None, model, CPU, steps=0)


@pytest.mark.slow
def test_gpu_check_compile_section_runs_aot_autograd(tmp_path):
    """Section 4 with AOTAutograd's tracing of the pieces (inductor's code generation takes minutes on a CPU)."""
    args = ["--device", "cpu", "--tiny", "--only", "compile", "--compile-backend", "aot_eager", "--compile-scope", "parts",
            "--output", str(tmp_path)]
    assert gpu_check.main(args) == 0
    compiled = json.loads((tmp_path / "gpu_check_tiny.json").read_text())["sections"]["compile"]
    assert compiled["status"] == "ok", compiled["error"]
    f = compiled["figures"]
    assert f["backend"] == "aot_eager" and f["scope"] == "parts" and f["compiled_median_s"] > 0 and f["graph_breaks"] == 0


def test_gpu_check_rejects_bad_flags_by_name(capsys):
    for argv, message in [
        (["--device", "cpu"], "--tiny"),
        (["--tiny", "--device", "cpu", "--budget", "0"], "--budget"),
        (["--tiny", "--only", "nope"], "--only"),
        (["--tiny", "--compile-backend", "tvm"], "--compile-backend"),
        (["--tiny", "--compile-scope", "all"], "--compile-scope"),
    ]:
        with pytest.raises(SystemExit):
            gpu_check.main(argv)
        assert message in capsys.readouterr().err


def test_largest_batch_steps_down_past_out_of_memory():
    tried, released = [], []

    def try_batch(batch):
        tried.append(batch)
        if batch > 12:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {batch}\nmore")

    batch, failed = model_step.largest_batch((32, 24, 16, 12, 8), try_batch, lambda: released.append(True))
    assert batch == 12 and tried == [32, 24, 16, 12] and len(released) == 3
    assert failed == {32: "CUDA out of memory at batch 32", 24: "CUDA out of memory at batch 24", 16: "CUDA out of memory at batch 16"}
    with pytest.raises(torch.OutOfMemoryError, match="none of the batch sizes"):
        model_step.largest_batch((16, 14), try_batch, lambda: None)

    def workspace(batch):
        if batch > 8:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    assert model_step.largest_batch((16, 8), workspace, lambda: None)[0] == 8

    def broken(batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):  # only memory errors mean "try a smaller batch"
        model_step.largest_batch((16, 8), broken, lambda: None)


def _synchronising_step():
    raise RuntimeError("called a synchronizing CUDA operation")  # stands in for a .item() under mode "error"


def test_describe_sync_names_the_innermost_repository_line():
    try:
        _synchronising_step()
    except RuntimeError as error:
        found = sync_debug.describe_sync(error)
    assert found["host_sync"] and found["operation"].startswith("tests/test_gpu_check.py:")
    assert "in _synchronising_step: raise RuntimeError" in found["operation"]
    assert found["stack"][-1] == found["operation"] and len(found["stack"]) == 2
    assert found["result"] == f"host sync at {found['operation']}"


def test_checkpoint_option_is_cm_masksd_with_checkpointed_branches():
    config, note = model_step.checkpoint_option()
    assert config.checkpoint_branches is True and config.lmvsd.enabled and config.vmlsd.enabled and "measured" in note


def test_a_failing_or_overrunning_section_is_recorded_and_the_check_goes_on(monkeypatch):
    monkeypatch.setattr(section, "MIN_SECTION_S", 0.05)
    check = gpu_check.GpuCheck(CPU, Plan.tiny(CPU), budget=2, argv=[])

    def out_of_memory(check, end):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    failed = check.run_section("vit_l14", out_of_memory)
    assert failed["status"] == "error" and failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    slow = check.run_section("compile", lambda check, end: time.sleep(30))  # stopped when the 2 s budget runs out
    assert slow["status"] == "timeout" and slow["seconds"] < 3
    assert check.run_section("torchrun", lambda check, end: {})["status"] == "out of budget"


def test_the_gpu_checks_torchrun_flags_train_the_sections_model_from_random_init():
    from examples.train_cris_masksd import parse_args

    for plan in (Plan.gpu(), Plan.tiny(CPU)):
        cfg = parse_args(plan.train_args(CPU, Path("/tmp/x")))
        small = plan.small
        assert cfg.pretrained is None and (cfg.model, cfg.image_size, cfg.quick_gelu) == (small.model, small.image_size, small.quick_gelu)
        assert (cfg.lr, cfg.weight_decay, cfg.amp, cfg.eval_every) == (small.lr, small.weight_decay, small.amp, 0)
    assert Plan.gpu().small.quick_gelu is True and Plan.gpu().small.amp == "bf16"  # what the openai presets build


def test_gpu_check_records_a_crashed_compile_process(tmp_path, monkeypatch):
    """Section 4 runs in its own process: when that process dies of a signal (inductor segfaulted once on the
    H200), the section records the signal and the other sections' results are still written."""
    monkeypatch.setattr(section, "run_process", lambda command, env, timeout: (-11, "Fatal Python error: Segmentation fault"))
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "sync_debug", "compile", "--output", str(tmp_path)]) == 1
    sections = json.loads((tmp_path / "gpu_check_tiny.json").read_text())["sections"]
    assert sections["compile"]["status"] == "error"
    assert "SIGSEGV" in sections["compile"]["error"] and "Segmentation fault" in sections["compile"]["error"]
    assert sections["sync_debug"]["status"] == "not applicable"


def test_gpu_check_plans_say_which_is_the_cpu_stand_in():
    """Section 4's child process gets --tiny only from the stand-in plan (a field once shadowed by Plan.tiny)."""
    assert Plan.gpu().stand_in is False and Plan.gpu().small.model == "ViT-B-16"
    assert Plan.tiny(CPU).stand_in is True


def test_gpu_check_records_a_compile_process_that_overruns(tmp_path, monkeypatch):
    def overrun(command, env, timeout):
        assert float(command[command.index("--budget") + 1]) >= section.MIN_SECTION_S
        assert command[1:3] == ["-m", "benchmarks.gpu_check"] and str(section.ROOT) in env["PYTHONPATH"]
        raise subprocess.TimeoutExpired(command, timeout, output=b"compile: first step with backend 'inductor'")

    monkeypatch.setattr(section, "run_process", overrun)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "compile", "--output", str(tmp_path)]) == 1
    compiled = json.loads((tmp_path / "gpu_check_tiny.json").read_text())["sections"]["compile"]
    assert compiled["status"] == "timeout" and "first step with backend" in compiled["error"]
