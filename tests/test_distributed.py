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
