"""The memory planner: exact figures per tier, the estimators agree, impossible configs refused."""
import pytest

from deepscale.runtime.offload.planner import (MIXED_PRECISION_ADAM, ByteSizes, check_fits, plan_memory, sizes_for)
from deepscale.runtime.offload.settings import OptimizerOffloadSettings
from deepscale.runtime.zero import estimate_zero2_model_states_mem_needs
from deepscale.runtime.zero.stage3.memory import estimate_zero3_model_states_mem_needs

PSI = 1_000_000


def test_no_offload_is_the_zero_paper():
    for stage, want in ((0, 16 * PSI), (1, 4 * PSI + 12 * PSI / 4), (2, 2 * PSI + 14 * PSI / 4), (3, 16 * PSI / 4)):
        plan = plan_memory(PSI, stage, 4, sizes=MIXED_PRECISION_ADAM)
        assert plan.device_bytes == pytest.approx(want)
        assert plan.host_bytes == plan.nvme_bytes == 0


def test_cpu_offload_moves_masters_states_and_gradient_partition_to_the_host():
    plan = plan_memory(PSI, 2, 4, ranks_per_node=2, sizes=MIXED_PRECISION_ADAM,
                       offload=OptimizerOffloadSettings(device="cpu"))
    assert plan.device_bytes == pytest.approx(2 * PSI + 2 * PSI / 4)
    assert plan.host_bytes == pytest.approx(16 * PSI / 4)
    assert plan.host_bytes_per_node == pytest.approx(2 * 16 * PSI / 4)
    half = plan_memory(PSI, 3, 4, sizes=MIXED_PRECISION_ADAM, offload=OptimizerOffloadSettings(device="cpu", ratio=0.5))
    assert half.host_bytes == pytest.approx(16 * PSI / 8)
    assert half.device_bytes == pytest.approx(2 * PSI / 4 + 2 * PSI / 8 + 12 * PSI / 8)


def test_nvme_offload_keeps_buffers_on_the_host_and_padded_states_on_disk():
    offload = OptimizerOffloadSettings(device="nvme", nvme_path="/x", sub_group_size=1000, buffer_count=3)
    plan = plan_memory(PSI, 3, 1, sizes=ByteSizes(param=4, grad=4), offload=offload)
    assert plan.detail["swap_buffers"] == 3 * 3 * 4 * 1000
    assert plan.host_bytes == 4 * PSI + 3 * 3 * 4 * 1000
    assert plan.nvme_bytes == -(-12 * PSI // (1 << 20)) * (1 << 20)


def test_estimators_are_the_planner():
    for offload in (False, True):
        est2 = estimate_zero2_model_states_mem_needs(PSI, num_gpus_per_node=4, num_nodes=2, cpu_offload=offload)
        plan2 = plan_memory(PSI, 2, 8, 4, MIXED_PRECISION_ADAM, OptimizerOffloadSettings(device="cpu" if offload
                                                                                          else "none"))
        assert est2 == {"device_bytes": plan2.device_bytes, "host_bytes_per_node": plan2.host_bytes_per_node}
        est3 = estimate_zero3_model_states_mem_needs(PSI, 5000, num_gpus_per_node=4, num_nodes=2, cpu_offload=offload)
        plan3 = plan_memory(PSI, 3, 8, 4, MIXED_PRECISION_ADAM, OptimizerOffloadSettings(device="cpu" if offload
                                                                                          else "none"), 5000)
        assert est3 == {"device_bytes": plan3.device_bytes, "host_bytes_per_node": plan3.host_bytes_per_node}


def test_check_fits_refuses_with_figures():
    offload = OptimizerOffloadSettings(device="nvme", nvme_path="/small")
    plan = plan_memory(10 * PSI, 3, 1, offload=offload)
    with pytest.raises(ValueError, match=r"NVMe: 0\.11 GiB of swap files needed per node .* 10\.24 MiB is free .*"
                                         r"nvme_path='/small'"):
        check_fits(plan, offload, host_available=1e12, nvme_free=10.24 * 2**20)
    with pytest.raises(ValueError, match="host memory: 0.15 GiB needed per node .* 0.95 MiB is available"):
        check_fits(plan, offload, host_available=1e6, nvme_free=None)
    check_fits(plan, offload, host_available=1e12, nvme_free=1e12)


def test_sizes_follow_dtype_and_optimizer():
    import torch
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert sizes_for(torch.bfloat16, torch.optim.AdamW(p)) == ByteSizes(2, 4, 4, 8, 4, 2)
    assert sizes_for(torch.float32, torch.optim.Adagrad(p)).state == 4
    assert sizes_for(torch.float32, torch.optim.SGD(p, lr=0.1)).state == 0
