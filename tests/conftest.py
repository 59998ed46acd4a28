import os

import torch

# Under pytest-xdist each worker gets one core; torch's default of one thread per core oversubscribes.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


HOST_READS = ("item", "tolist", "__bool__", "nonzero", "numpy", "__int__", "__float__")
"""The Tensor methods that read values on the host: each waits for the device."""


def refuse_host_reads(monkeypatch, what: str) -> None:
    """Until ``monkeypatch.undo()``, every Tensor method that reads values on the host raises, naming ``what``
    (e.g. "the training step"): a test of code that must never wait for the device."""

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"{what} read a tensor value with Tensor.{name}")
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
