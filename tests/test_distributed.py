"""init_distributed: a torchrun launch joins a process group even with one process; a plain run never does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from examples.pipeline.distributed import cleanup_distributed, init_distributed
from tests.test_training import losses, read_log

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_plain_run_joins_no_group(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert not env.enabled and not dist.is_initialized()
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)


def test_a_one_process_torchrun_environment_joins_a_gloo_group(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    env = init_distributed("cpu")
    try:
        assert env.enabled and dist.is_initialized() and dist.get_backend() == "gloo"
        assert (env.rank, env.world_size) == (0, 1)
    finally:
        cleanup_distributed()
    assert not dist.is_initialized()


RUN_SCRIPT = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
import torch.distributed as dist
from examples.pipeline import loop, trainer
from examples.pipeline.distributed import init_distributed
from tests.test_training import tiny

torch.set_num_threads(1)
env = init_distributed("cpu")
report = {{"enabled": env.enabled, "backend": dist.get_backend() if dist.is_initialized() else None, "ddp": 0}}

class CountedDDP(loop.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        report["ddp"] += 1

loop.DistributedDataParallel = CountedDDP
out = Path(sys.argv[1])
trainer.train(tiny(out, epochs=1, max_steps=4, overlays=0, eval_untrained=False), evaluate_at_end=False)
(out / "report.json").write_text(json.dumps(report))
"""


@pytest.mark.slow
def test_one_process_torchrun_trains_exactly_like_a_plain_run(tmp_path):
    """The same 4 steps, as `python script` and as `torchrun --nproc_per_node=1 script` (gloo, DDP around the
    model): the torchrun run is in a process group and its logged losses equal the plain run's bit for bit."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    launchers = {
        "plain": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"],
    }
    reports, logs = {}, {}
    for name, launcher in launchers.items():
        out = tmp_path / name
        proc = subprocess.run([*launcher, str(script), str(out)], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((out / "report.json").read_text())
        logs[name] = losses(read_log(out / "train_log.csv"))
    assert reports["plain"] == {"enabled": False, "backend": None, "ddp": 0}
    assert reports["torchrun"] == {"enabled": True, "backend": "gloo", "ddp": 1}
    assert sorted(logs["plain"]) == [1, 2, 3, 4]
    assert logs["torchrun"] == logs["plain"]


RESTART_SCRIPT = """
import os, signal, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from examples.pipeline import loop, trainer
from tests.test_training import tiny

torch.set_num_threads(1)
kill_at = int(sys.argv[2])
step = loop.TrainingLoop._train_step


def dying_step(self, batch):  # rank 1 of the first attempt dies in the middle of step kill_at
    if kill_at and self.step + 1 == kill_at and self.env.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch)


loop.TrainingLoop._train_step = dying_step
if os.environ["RANK"] == "0":  # which attempts ran
    with open(Path(sys.argv[1] + ".attempts"), "a") as f:
        f.write(os.environ["TORCHELASTIC_RESTART_COUNT"] + " ")
trainer.train(tiny(Path(sys.argv[1]), epochs=2, save_every=3, overlays=0, eval_untrained=False, resume="auto"),
              evaluate_at_end=False)
"""


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(tmp_path):
    """Two gloo ranks under torchrun --max-restarts=1 with --resume auto: rank 1 is killed in step 5 (the last
    checkpoint is step 3); torchrun restarts both ranks, they resume from step 3, and the finished run's losses
    equal an uninterrupted run's at every step."""
    script = tmp_path / "run.py"
    script.write_text(RESTART_SCRIPT.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    logs = {}
    for name, kill_at in (("uninterrupted", 0), ("killed", 5)):
        out = tmp_path / name
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "--max-restarts=1", str(script), str(out), str(kill_at)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = losses(read_log(out / "train_log.csv"))
        attempts = Path(f"{out}.attempts").read_text().split()
        assert attempts == (["0", "1"] if kill_at else ["0"]), proc.stderr[-2000:]
    assert sorted(logs["uninterrupted"]) == list(range(1, 17))  # 64 scenes / global batch 8, 2 epochs
    assert logs["killed"] == logs["uninterrupted"]
