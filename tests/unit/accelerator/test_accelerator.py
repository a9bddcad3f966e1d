"""get_accelerator(): automatic choice, env override, CPU behaviour."""
import pytest
import torch

from deepscale.accelerator import real_accelerator
from deepscale.accelerator.cpu_accelerator import CPUAccelerator


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(real_accelerator, "_accelerator", None)
    return monkeypatch


def test_cpu_chosen_without_cuda(fresh):
    fresh.delenv("DEEPSCALE_ACCELERATOR", raising=False)
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    acc = real_accelerator.get_accelerator()
    assert isinstance(acc, CPUAccelerator)
    assert acc.communication_backend_name() == "gloo"
    assert acc.device_name() == "cpu" and acc.current_device_name() == "cpu"


def test_env_override_and_bad_value(fresh):
    fresh.setenv("DEEPSCALE_ACCELERATOR", "cpu")
    assert real_accelerator.get_accelerator().device_name() == "cpu"
    fresh.setattr(real_accelerator, "_accelerator", None)
    fresh.setenv("DEEPSCALE_ACCELERATOR", "tpu")
    with pytest.raises(ValueError, match="allowed values: cpu, cuda"):
        real_accelerator.get_accelerator()


def test_cuda_override_without_gpu_is_clear(fresh):
    fresh.setenv("DEEPSCALE_ACCELERATOR", "cuda")
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        real_accelerator.get_accelerator()


def test_cpu_methods(monkeypatch):
    acc = CPUAccelerator()
    monkeypatch.setenv("LOCAL_SIZE", "3")
    assert acc.device_count() == 3
    monkeypatch.delenv("LOCAL_SIZE")
    assert acc.device_count() == 1
    assert acc.is_available() and acc.is_bf16_supported() and acc.is_fp16_supported()
    acc.set_device(2)
    assert acc.current_device() == 2
    acc.manual_seed(3)
    a = torch.rand(3)
    acc.manual_seed(3)
    assert torch.equal(a, torch.rand(3))
    assert acc.memory_allocated() > 0 and acc.max_memory_allocated() >= acc.memory_allocated() // 2
    assert acc.total_memory() >= acc.available_memory() > 0
    t = torch.ones(2)
    assert acc.pin_memory(t) is t
    stream, event = acc.Stream(), acc.Event()
    with acc.stream(stream):
        event.record()
    event.synchronize()
    acc.synchronize()
    assert acc.current_stream().query()
