"""``see_memory_usage`` and the ``memory_breakdown`` switch."""
import logging

import pytest

from dist_harness import run_distributed

from _monitor_models import TokenNet, engine_config, token_batch


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _breakdown_body(memory_breakdown):
    import torch.distributed as dist
    import deepscale
    from deepscale.runtime.utils import see_memory_usage
    from deepscale.utils.logging import logger

    capture = _Capture()
    logger.addHandler(capture)
    try:
        see_memory_usage("silent unless forced")
        see_memory_usage("forced call", force=True)
        engine, _, _, _ = deepscale.initialize(model=TokenNet(),
                                               config=engine_config(2, 1, dist.get_world_size(),
                                                                    memory_breakdown=memory_breakdown))
        engine.backward(engine(*token_batch(0, 0, dist.get_rank(), 2)))
        engine.step()
        engine.destroy()
    finally:
        logger.removeHandler(capture)
    return [m for m in capture.messages if "MA " in m]


@pytest.mark.parametrize("memory_breakdown", [False, True])
def test_memory_breakdown_logs_after_each_phase_on_rank0(memory_breakdown):
    rank0, rank1 = run_distributed(_breakdown_body, 2, args=(memory_breakdown,))
    assert rank1 == []
    assert not any("silent unless forced" in m for m in rank0)
    assert len(rank0) == (4 if memory_breakdown else 1)
    assert "forced call" in rank0[0] and "Max_MA" in rank0[0] and "CPU Virtual Memory" in rank0[0]
    if memory_breakdown:
        assert ["after forward" in rank0[1], "after backward" in rank0[2], "after step" in rank0[3]] == [True] * 3
