"""Fault injection: every way a run can be interrupted, starved or fed bad values, each at a chosen point,
in the spirit of the refer fuzzing harness (tests/test_fuzz_refer.py). Each kind of fault is one test,
registered in :data:`FAULTS` with what it must end in: one line on stderr naming the argument, file or
step (exit status 2, or 130 for Ctrl-C), or a correct recovery (a resumed run's losses equal an
uninterrupted run's). Nothing may be lost or pass silently. docs/faults.md lists the kinds and states
their number; the last test checks it."""

from __future__ import annotations

import csv
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.pipeline.checkpoint import load_checkpoint
from examples.pipeline.cli import run_script
from examples.pipeline.guard import nonfinite_tensors
from tests.conftest import refuse_host_reads

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "faults.md"

FAULTS: dict[str, str] = {}
"""Fault kind -> what it ends in; filled as the tests below are defined (docs/faults.md lists the same)."""


def fault(kind: str, outcome: str):
    """Register the decorated test as the one covering ``kind``."""

    def register(test):
        assert kind not in FAULTS, f"two tests for {kind!r}"
        FAULTS[kind] = outcome
        return test

    return register


# A run small enough for a subprocess: random tiny CRIS at 32 px, batches of 2, 4 steps an epoch, 2 epochs.
RUN = ["--synthetic-train-size", "8", "--synthetic-eval-size", "4", "--batch-size", "2", "--epochs", "2",
       "--warmup-epochs", "0.5", "--image-size", "32", "--pretrained", "none", "--log-every", "1", "--save-every", "2",
       "--no-progress", "--overlays", "0", "--no-eval-untrained", "--no-eval-guidance", "--workers", "0"]


def flags(output: Path, *more: str) -> list[str]:
    return [*RUN, "--output", str(output), *more]


def one_line_error(capsys, main, argv: list[str], status: int = 2) -> str:
    """Run a script's main through run_script: it must exit with ``status`` and one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        run_script(main, argv)
    assert exit_.value.code == status
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("WARNING:")]  # open_clip's log of a random init
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def read_losses(path: Path) -> dict[int, tuple[str, ...]]:
    with open(path, newline="") as f:
        return {int(row["step"]): (row["loss"], row["seg"], row["lmvsd"], row["vmlsd"]) for row in csv.DictReader(f)}


@pytest.fixture
def one_thread():
    """The in-process runs compared with a subprocess run the same arithmetic: one thread, as the subprocess."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, tuple[str, ...]]:
    """The uninterrupted run's losses at every step."""
    from examples.train_cris_masksd import main

    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_script(main, flags(out))
    finally:
        torch.set_num_threads(before)
    return read_losses(out / "train_log.csv")


DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from examples.pipeline import loop
{patch}
from examples.pipeline.cli import run_script
from examples.train_cris_masksd import main
sys.argv = ["train_cris_masksd.py"]
run_script(main, {argv!r})
"""

CHILDREN = """
def children():  # this process's children (the DataLoader workers), written where the test reads them
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{{task}}/children") as f:
            pids += f.read().split()
    with open({path!r}, "w") as f:
        f.write(" ".join(pids))
"""


def run_driver(tmp_path: Path, patch: str, argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the trainer in a subprocess with ``patch`` (Python run before the script) applied."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT), patch=patch, argv=argv))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout)


def gone(pids: list[int], within: float = 10.0) -> list[int]:
    """The processes of ``pids`` still alive (zombies count as gone) after waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state != "Z":
                alive.append(pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from Linux's /proc")


# ------------------------------------------------------------------------------------------------ signals
@linux_only
@pytest.mark.slow
@fault("SIGKILL during a checkpoint write",
       "the previous last.pt intact; the temporary file removed at the next start; --resume auto repeats the uninterrupted losses")
def test_kill_during_a_checkpoint_write_keeps_the_last_one_and_resumes_exactly(tmp_path, reference, one_thread):
    # killed in the second save (step 4), after the temporary file is written, before it replaces last.pt
    patch = textwrap.dedent("""
        from examples.pipeline import checkpoint
        fsyncs, real_fsync = [], os.fsync
        def fsync(fd):
            fsyncs.append(fd)
            if len(fsyncs) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real_fsync(fd)
        checkpoint.os.fsync = fsync
    """)
    out = tmp_path / "run"
    proc = run_driver(tmp_path, patch, flags(out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(out / "last.pt")["step"] == 2
    stale = [p.name for p in out.iterdir() if p.name.startswith(".last.pt.")]
    assert len(stale) == 1, "the kill must land mid-write"

    from examples.train_cris_masksd import main

    run_script(main, flags(out, "--resume", "auto"))
    assert not [p for p in out.iterdir() if p.name.startswith(".last.pt.")]
    assert read_losses(out / "train_log.csv") == reference


@linux_only
@pytest.mark.slow
@fault("SIGTERM mid-training (preemption), with DataLoader workers",
       "the process ends; its workers end with it; --resume auto repeats the uninterrupted losses")
def test_sigterm_mid_training_leaves_no_worker_and_resumes_exactly(tmp_path, reference, one_thread):
    pids = tmp_path / "workers.txt"
    patch = CHILDREN.format(path=str(pids)) + textwrap.dedent("""
        real_step = loop.TrainingLoop._train_step
        def step(self, batch):
            if self.step == 5:
                children()
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(self, batch)
        loop.TrainingLoop._train_step = step
    """)
    out = tmp_path / "run"
    proc = run_driver(tmp_path, patch, flags(out, "--workers", "2"))
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    assert gone(workers) == [], "DataLoader workers outlived the run"
    assert load_checkpoint(out / "last.pt")["step"] == 4

    from examples.train_cris_masksd import main

    run_script(main, flags(out, "--resume", "auto"))
    assert read_losses(out / "train_log.csv") == reference


@pytest.mark.slow
@fault("SIGINT (Ctrl-C) mid-training",
       "one line ('interrupted'), exit status 130, the log rows so far kept; --resume auto repeats the uninterrupted losses")
def test_ctrl_c_mid_training_is_one_line_and_resumes_exactly(tmp_path, reference, one_thread):
    patch = textwrap.dedent("""
        real_step = loop.TrainingLoop._train_step
        def step(self, batch):
            if self.step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(self, batch)
        loop.TrainingLoop._train_step = step
    """)
    out = tmp_path / "run"
    proc = run_driver(tmp_path, patch, flags(out))
    assert proc.returncode == 130, proc.stderr
    assert [line for line in proc.stderr.strip().splitlines() if not line.startswith("WARNING:")] == [
        "train_cris_masksd.py: interrupted; a training run continues from its last checkpoint with --resume auto"]
    assert sorted(read_losses(out / "train_log.csv")) == [1, 2, 3]  # every finished step's row was written
    assert load_checkpoint(out / "last.pt")["step"] == 2

    from examples.train_cris_masksd import main

    run_script(main, flags(out, "--resume", "auto"))
    assert read_losses(out / "train_log.csv") == reference


# ------------------------------------------------------------------------------------------------ workers
ORPHAN = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
from torch.utils.data import DataLoader, Dataset
from examples.pipeline.workers import exit_with_parent

class Large(Dataset):  # items that fill the pipe to the parent, as images do: a worker then blocks writing
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        return bytes(1 << 20)

init = exit_with_parent() if {guarded} else None
loader = iter(DataLoader(Large(), batch_size=1, num_workers=2, worker_init_fn=init, prefetch_factor=8))
next(loader)
pids = []
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{{task}}/children") as f:
        pids += f.read().split()
print(" ".join(pids), flush=True)
time.sleep(60)
"""


@linux_only
@pytest.mark.slow
@fault("the parent of DataLoader workers killed (kill -9)",
       "the workers exit within seconds (PR_SET_PDEATHSIG); without the guard they are left behind")
def test_workers_exit_when_their_parent_is_killed(tmp_path):
    survivors = {}
    for guarded in (False, True):  # unguarded first: proves the test can see an orphan
        script = tmp_path / f"orphan_{guarded}.py"
        script.write_text(ORPHAN.format(root=str(ROOT), guarded=guarded))
        parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        try:
            workers = [int(p) for p in parent.stdout.readline().split()]
        finally:
            parent.kill()
            parent.wait(timeout=30)
        assert len(workers) == 2
        survivors[guarded] = gone(workers, within=3.0 if not guarded else 10.0)
        for pid in survivors[guarded]:  # the unguarded orphans: ours to end
            os.kill(pid, signal.SIGKILL)
    assert survivors[False], "an unguarded worker should outlive its parent (else this test proves nothing)"
    assert survivors[True] == []


@fault("a DataLoader worker killed mid-epoch (OOM killer)",
       "one line: a data-loading worker died, with what to do; exit status 2; last.pt intact")
def test_a_dead_worker_is_one_line(tmp_path, capsys, monkeypatch, one_thread):
    from examples.pipeline import trainer
    from examples.train_cris_masksd import main

    build = trainer.build_dataset

    class KillsItsWorker(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def set_epoch(self, epoch):
            self.epoch = epoch
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)

        def __getitem__(self, index):
            if getattr(self, "epoch", 0) == 1 and torch.utils.data.get_worker_info() is not None:
                os.kill(os.getpid(), signal.SIGKILL)  # the second epoch's worker dies as the OOM killer would end it
            return self.dataset[index]

    monkeypatch.setattr(trainer, "build_dataset", lambda cfg, split, train: KillsItsWorker(build(cfg, split, train)) if train else build(cfg, split, train))
    out = tmp_path / "run"
    err = one_line_error(capsys, main, flags(out, "--workers", "1"))
    assert re.search(r"a data-loading worker died \(DataLoader worker \(pids?\(?s?\)? \d+\) (is killed by signal: Killed|exited "
                     r"unexpectedly)\): out of memory\?", err), err
    assert load_checkpoint(out / "last.pt")["step"] == 4  # the first epoch's end


# ------------------------------------------------------------------------------------------------ disks
@fault("a full disk during a checkpoint write (ENOSPC)",
       "one line naming the folder, the space needed and free; the previous last.pt intact; no temporary file left")
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, one_thread):
    from examples.pipeline import checkpoint
    from examples.train_cris_masksd import main

    saves, real_save = [], torch.save

    def save(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    out = tmp_path / "run"
    err = one_line_error(capsys, main, flags(out))
    assert re.search(rf"no space left in {re.escape(str(out))} to write last.pt: it needs about [\d.]+ MiB and [\d.]+ MiB are free "
                     r"\(after removing the partial file\); the previous last.pt is intact", err), err
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
@fault("a real filesystem that fills (a 48 MiB tmpfs)",
       "the same line as ENOSPC (torch.save's own error there names no errno); the previous last.pt intact")
def test_a_real_full_filesystem(tmp_path, capsys, one_thread):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    from examples.train_cris_masksd import main

    mount = tmp_path / "small"
    mount.mkdir()
    # one tiny checkpoint (~38 MiB, mostly CLIP's token embedding and its Adam moments) fits, a second beside it not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine refuses to mount a tmpfs (a container without CAP_SYS_ADMIN?)")
    try:
        out = mount / "run"
        err = one_line_error(capsys, main, flags(out))
        assert re.search(rf"no space left in {re.escape(str(out))} to write last.pt: it needs about [\d.]+ MiB", err), err
        assert "the previous last.pt is intact" in err
        assert load_checkpoint(out / "last.pt")["step"] == 2
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ------------------------------------------------------------------------------------------------ divergence
@fault("a loss that diverges (--lr 1e6)",
       "one line naming the step and the non-finite loss terms; exit status 2; the last finite last.pt kept; "
       "stopped within 2 x --log-every - 1 steps")
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, one_thread):
    from examples.train_cris_masksd import main

    out = tmp_path / "run"
    err = one_line_error(capsys, main, flags(out, "--lr", "1e6", "--save-every", "1", "--log-every", "2"))
    found = re.fullmatch(r".*training diverged at step (\d+): (.+) (?:is|are) not finite \(loss \w+, seg .*\); stopped at step "
                         r"(\d+); (.+)/last.pt \(step (\d+)\) is kept\. Lower --lr, or set --grad-clip .*", err)
    assert found, err
    first, stopped, kept = int(found.group(1)), int(found.group(3)), int(found.group(5))
    assert first <= stopped <= first + 2 * 2 - 1  # the documented bound, log_every = 2
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == kept < first and nonfinite_tensors(checkpoint["model"]) == []
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(row["loss"] == "nan" for row in rows)  # the evidence is logged


@fault("a checkpoint with non-finite weights given to evaluate.py, predict.py or --resume",
       "one line naming the file and the number of non-finite tensors")
def test_a_diverged_checkpoint_is_refused_by_name(tmp_path, capsys, one_thread):
    from examples.evaluate import main as evaluate
    from examples.predict import main as predict
    from examples.train_cris_masksd import main as train

    out = tmp_path / "run"
    run_script(train, flags(out, "--max-steps", "2"))
    state = load_checkpoint(out / "last.pt")
    for name in list(state["model"])[:3]:
        if state["model"][name].is_floating_point():
            state["model"][name].fill_(float("nan"))
    torch.save(state, out / "nan.pt")
    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    for main, argv in [(evaluate, ["--checkpoint", str(out / "nan.pt"), "--workers", "0", "--no-progress"]),
                       (predict, ["--checkpoint", str(out / "nan.pt"), "--image", str(image), "--text", "the circle"]),
                       (train, flags(tmp_path / "again", "--resume", str(out / "nan.pt")))]:
        err = one_line_error(capsys, main, argv)
        assert re.search(rf"checkpoint {re.escape(str(out / 'nan.pt'))} holds non-finite weights in \d+ of \d+ tensors \(e\.g\. .+\): "
                         r"training diverged; use an earlier checkpoint", err), err


@fault("weights that overflow in a step whose loss was finite",
       "one line: the model after that step holds non-finite weights, stopped without saving it; last.pt kept")
def test_weights_that_overflow_are_never_saved(tmp_path, capsys, monkeypatch, one_thread):
    from examples.pipeline import loop
    from examples.train_cris_masksd import main

    real_step = loop.TrainingLoop._train_step

    def step(self, batch):
        parts = real_step(self, batch)
        if self.step == 3:  # the update of step 4 overflows one weight; its loss was computed before, finite
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("inf")
        return parts

    monkeypatch.setattr(loop.TrainingLoop, "_train_step", step)
    out = tmp_path / "run"
    err = one_line_error(capsys, main, flags(out, "--log-every", "4"))
    assert re.search(r"the model after step 4 holds non-finite weights in 1 of \d+ tensors .*: training diverged; stopped "
                     rf"without saving it; {re.escape(str(out))}/last.pt \(step 2\) is kept", err), err
    assert nonfinite_tensors(load_checkpoint(out / "last.pt")["model"]) == []


@fault("fp16 gradient overflow (GradScaler skips the step)",
       "not divergence: the run finishes, the scaler lowers its scale, every logged loss is finite")
def test_amp_skipped_steps_are_not_divergence(tmp_path, monkeypatch, one_thread):
    from examples.train_cris_masksd import main

    real = torch.amp.GradScaler

    def huge(device, *args, **kwargs):  # a scale whose gradients overflow: the scaler skips steps, loss stays finite
        return real(device, *args, **{**kwargs, "init_scale": 2.0**100})

    monkeypatch.setattr(torch.amp, "GradScaler", huge)
    out = tmp_path / "run"
    run_script(main, flags(out, "--amp", "fp16", "--max-steps", "4"))
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 4 and checkpoint["scaler"]["scale"] < 2.0**100  # steps were skipped
    assert all(np.isfinite(float(v)) for row in read_losses(out / "train_log.csv").values() for v in row)


# ------------------------------------------------------------------------------------------------ run folders
@fault("a new run into an --output that holds a run",
       "one line naming the folder, what it holds and the two ways on (--resume auto, --overwrite); nothing replaced")
def test_a_run_folder_is_never_overwritten_unasked(tmp_path, capsys, one_thread):
    from examples.train_cris_masksd import main

    out = tmp_path / "run"
    run_script(main, flags(out, "--max-steps", "2"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = one_line_error(capsys, main, flags(out, "--max-steps", "1"))
    assert err.endswith(f"--output {out} holds a run (last.pt, train_log.csv; logged up to step 2): pass --resume auto to "
                        f"continue it, or --overwrite to replace it with a new run (--debug shows the traceback)"), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    err = one_line_error(capsys, main, flags(out, "--overwrite", "--resume", "auto"))
    assert "--overwrite starts a new run, --resume continues one" in err
    run_script(main, flags(out, "--max-steps", "1", "--overwrite"))
    assert load_checkpoint(out / "last.pt")["step"] == 1 and sorted(read_losses(out / "train_log.csv")) == [1]


@fault("an --output that is a file", "one line: --output ... is a file, not a run folder")
def test_an_output_that_is_a_file(tmp_path, capsys):
    from examples.train_cris_masksd import main

    (tmp_path / "notes").write_text("mine")
    err = one_line_error(capsys, main, flags(tmp_path / "notes"))
    assert f"--output {tmp_path / 'notes'} is a file, not a run folder" in err
    assert (tmp_path / "notes").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ values
@fault("mask values outside [0, 1] ({0, 255} PNG masks, [-1, 1] masks)",
       "a ValueError naming ground_truth, the range found and the samples, with the hint to divide by 255: from the "
       "loss functions, MaskSD.check_inputs and the trainer's first batch (one line)")
def test_mask_values_out_of_range_are_refused(tmp_path, capsys, monkeypatch, one_thread):
    from examples.pipeline import trainer
    from examples.train_cris_masksd import main
    from masksd import SelfDistillLoss, segmentation_loss

    with pytest.raises(ValueError, match=r"ground_truth values must lie in \[0, 1\] .*got values in \[255, 255\] in samples \[0\]; "
                                         r"an 8-bit image mask\? divide it by 255"):
        segmentation_loss(torch.full((1, 1, 4, 4), 3.0), torch.full((1, 1, 4, 4), 255.0))  # was -761.95
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\] in samples \[1\]$"):
        segmentation_loss(torch.zeros(2, 1, 4, 4), torch.tensor([0.0, 1.0, -1.0, 1.0]).view(2, 1, 2, 1).expand(2, 1, 2, 2))
    with pytest.raises(ValueError, match=r"ground_truth values must lie in \[0, 1\]"):
        SelfDistillLoss(1.0, supervision="ground_truth")(torch.zeros(1, 1, 4, 4), ground_truth=torch.full((1, 1, 4, 4), 255.0))
    unchecked = segmentation_loss(torch.full((1, 1, 4, 4), 3.0), torch.full((1, 1, 4, 4), 255.0), check_values=False)
    assert unchecked.item() == pytest.approx(-761.95, abs=0.01)  # the negative, unbounded loss the check prevents

    build = trainer.build_dataset

    class Png(torch.utils.data.Dataset):  # masks as an 8-bit PNG loads them
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            return {**self.dataset[index], "mask": self.dataset[index]["mask"] * 255}

    monkeypatch.setattr(trainer, "build_dataset", lambda cfg, split, train: Png(build(cfg, split, train)))
    err = one_line_error(capsys, main, flags(tmp_path / "run"))
    assert "ground_truth values must lie in [0, 1]" in err and "divide it by 255" in err
    assert not (tmp_path / "run" / "last.pt").exists()


@fault("NaN or infinite images, masks or teacher logits",
       "a ValueError naming the argument and the samples: MaskSD.check_inputs, segmentation_loss, SelfDistillLoss")
def test_non_finite_values_are_refused_by_name():
    from examples.cris import CRIS, CRISConfig
    from masksd import MaskSD, SelfDistillLoss, segmentation_loss

    model = MaskSD(CRIS(CRISConfig.tiny(image_size=32, pretrained=None)))
    images, tokens, masks = torch.zeros(2, 3, 32, 32), model.segmenter.tokenize(["a red circle", "the square"]), torch.zeros(2, 1, 32, 32)
    model.check_inputs(images, tokens, masks)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images holds NaN or infinite values in samples \[1\]"):
        model.check_inputs(images, tokens, masks)
    masks[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ground_truth holds NaN or infinite values in samples \[0\]"):
        segmentation_loss(torch.zeros(2, 1, 8, 8), masks)
    teacher = torch.zeros(2, 1, 8, 8)
    teacher[1] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits holds NaN or infinite values in samples \[1\]"):
        SelfDistillLoss(0.5)(torch.zeros(2, 1, 8, 8), teacher)


@fault("an empty batch", "a ValueError naming the tensor: a loss over no samples would be NaN")
def test_an_empty_batch_is_refused():
    from examples.cris import CRIS, CRISConfig
    from masksd import MaskSD, SelfDistillLoss, segmentation_loss

    with pytest.raises(ValueError, match=r"logits is an empty batch \(shape \(0, 1, 4, 4\)\)"):
        segmentation_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="student_logits is an empty batch"):
        SelfDistillLoss(0.5)(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4))
    model = MaskSD(CRIS(CRISConfig.tiny(image_size=32, pretrained=None)))
    with pytest.raises(ValueError, match="images is an empty batch"):
        model.check_inputs(torch.zeros(0, 3, 32, 32), torch.zeros(0, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ files
@fault("a truncated file given to --pretrained", "one line: pretrained=... is truncated or not a file torch.save wrote")
def test_a_truncated_pretrained_file(tmp_path, capsys):
    from examples.cris.config import SHIPPED_WEIGHTS
    from examples.train_cris_masksd import main

    shipped = SHIPPED_WEIGHTS["masksd-tiny-synthetic"][1].read_bytes()
    (tmp_path / "half.pt").write_bytes(shipped[: len(shipped) // 2])
    argv = [a for a in flags(tmp_path / "run") if a not in ("--pretrained", "none", "--image-size", "32")]
    err = one_line_error(capsys, main, [*argv, "--pretrained", str(tmp_path / "half.pt")])
    assert f"pretrained='{tmp_path / 'half.pt'}' is truncated or not a file torch.save wrote (a partial download or copy?)" in err


@fault("a training checkpoint given to --pretrained",
       "one line: it is a training checkpoint (of MaskSD), not CLIP weights, and what to do with it")
def test_a_training_checkpoint_given_as_pretrained_weights(tmp_path, capsys, one_thread):
    from examples.train_cris_masksd import main

    run_script(main, flags(tmp_path / "first", "--max-steps", "1"))
    err = one_line_error(capsys, main, flags(tmp_path / "second") + ["--pretrained", str(tmp_path / "first" / "last.pt")])
    assert f"pretrained='{tmp_path / 'first' / 'last.pt'}' is a training checkpoint (of MaskSD), not CLIP weights" in err


@fault("a folder given as --checkpoint or --image", "one line: ... is a folder, not a checkpoint (image) file")
def test_a_folder_given_as_a_file(tmp_path, capsys, one_thread):
    from examples.evaluate import main as evaluate
    from examples.predict import main as predict
    from examples.train_cris_masksd import main as train

    run_script(train, flags(tmp_path / "run", "--max-steps", "1"))
    err = one_line_error(capsys, evaluate, ["--checkpoint", str(tmp_path / "run")])
    assert f"checkpoint {tmp_path / 'run'} is a folder, not a checkpoint file (it holds last.pt and export/: pass one of them)" in err
    err = one_line_error(capsys, predict, ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--image", str(tmp_path), "--text", "a"])
    assert f"--image {tmp_path} is a folder, not an image file" in err


@fault("a bad image read in a DataLoader worker (--workers 1)",
       "the same one line as without workers (the worker's own message, not its flattened traceback)")
def test_a_bad_image_in_a_worker_is_the_same_one_line(tmp_path, capsys, one_thread):
    from examples.train_cris_masksd import main
    from tests.test_refer import write_refer_root

    root = write_refer_root(tmp_path / "refer")
    for image in (root / "images" / "mscoco" / "images" / "train2014").iterdir():
        image.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    argv = ["--dataset", "refcoco", "--data-root", str(root), "--batch-size", "2", "--max-steps", "1", "--image-size", "32",
            "--pretrained", "none", "--no-progress", "--overlays", "0", "--no-eval-untrained", "--no-eval-guidance"]
    lines = {workers: one_line_error(capsys, main, [*argv, "--workers", workers, "--output", str(tmp_path / f"run{workers}")])
             for workers in ("0", "1")}
    assert lines["0"] == lines["1"] and "could not decode image" in lines["1"], lines
    assert "DataLoader worker" not in lines["1"] and "Traceback" not in lines["1"]


# ------------------------------------------------------------------------------------------------ text
@fault("an expression longer than the text context",
       "a warning, once, with the counts and an example; the total at the end of training; predict.py says what it read")
def test_truncated_expressions_are_warned_once_with_counts(tmp_path, capsys):
    from examples.cris import CRIS, CRISConfig

    model = CRIS(CRISConfig.tiny(image_size=32, pretrained=None, max_words=6))
    long = "the small red circle at the far left of the picture"
    with pytest.warns(UserWarning, match=r"1 of 2 expressions in this batch need more than the 6 token positions .*"
                                         r"texts\[1\] needs 13: 'the small red circle .*raise --max-words"):
        ids = model.tokenize(["a square", long])
    assert torch.equal(ids, model._tokenizer(["a square", long], context_length=6))  # cut as open_clip cuts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second cut is counted, not warned
        model.tokenize([long, long])
    assert (model.truncation.cut, model.truncation.seen) == (3, 4)
    assert model.truncation.summary() == "3 of 4 expressions were cut to 6 token positions (raise --max-words to keep them)"


@fault("undecodable (non-UTF-8) text on the command line",
       "one line naming the byte and its position, before any model is loaded")
def test_undecodable_text_is_refused(tmp_path, capsys):
    from examples.predict import main

    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    text = b"the caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 bytes in argv
    err = one_line_error(capsys, main, ["--checkpoint", "x.pt", "--image", str(image), "--text", text])
    assert "argument --text: b'the caf\\xe9' is not UTF-8 text (byte 0xe9 at character 7): pass the text in UTF-8" in err


@fault("pretrain_clip.py with a batch of one pair",
       "one line: batch_size must be >= 2 for contrastive pretraining (the loss would be exactly 0)")
def test_contrastive_pretraining_refuses_a_batch_of_one(tmp_path, capsys):
    from examples.pretrain_clip import main

    err = one_line_error(capsys, main, ["--batch-size", "1", "--output", str(tmp_path / "run")])
    assert "batch_size must be >= 2 for contrastive pretraining" in err and "exactly 0" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ the docs
def test_the_docs_list_every_fault_kind_and_state_their_number():
    text = DOCS.read_text()
    stated = re.search(r"covers\s+(\d+)\s+kinds\s+of\s+fault", text)
    assert stated and int(stated.group(1)) == len(FAULTS), f"docs/faults.md states another number than {len(FAULTS)}"
    listed = " ".join(text.split())
    missing = [kind for kind in FAULTS if " ".join(kind.split()) not in listed]
    assert not missing, f"docs/faults.md does not list {missing}"
    readme = re.search(r"\((\d+) kinds injected by the tests\)", (ROOT / "README.md").read_text())
    assert readme and int(readme.group(1)) == len(FAULTS), "the README's docs table states another number of fault kinds"


def test_the_guard_reads_no_tensor_value_per_step(monkeypatch):
    """DivergenceGuard.observe runs in every training step: it may not wait for the device (no item, tolist,
    bool...); only check and stop, at log rows and checkpoints, read values."""
    from examples.pipeline.guard import DivergenceGuard, TrainingDiverged

    guard = DivergenceGuard(("loss", "seg", "lmvsd"), torch.device("cpu"))
    steps = [{"loss": torch.tensor(0.5), "seg": torch.tensor(0.5), "lmvsd": None},
             {"loss": torch.tensor(float("nan")), "seg": torch.tensor(float("inf")), "lmvsd": torch.tensor(float("nan"))},
             {"loss": torch.tensor(float("nan")), "seg": torch.tensor(1.0), "lmvsd": torch.tensor(float("nan"))}]
    refuse_host_reads(monkeypatch, "the guard")
    for step, losses in enumerate(steps, 1):
        guard.observe(losses, step)
    monkeypatch.undo()
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2: seg and lmvsd are not finite \(loss nan, seg inf, "
                                               r"lmvsd nan\); stopped at step 3; no checkpoint was written"):
        guard.check(3, "no checkpoint was written")
