"""3D layout checks that need no processes: the config's tensor-parallel degree, AutoTP and Ulysses
against a PipelineModule's topology, and a Megatron-style mpu whose layout disagrees (rank 0)."""
import pytest

from deepscale.pipe import PipeModelDataParallelTopology
from deepscale.runtime.pipe.tp_compose import check_mpu_layout, pipeline_mpu


class _Module:
    def __init__(self, topology):
        self._topology = topology

    def topology(self):
        return self._topology


class _Mpu:
    """Megatron names; rank 0 at the given coordinates of the given degrees."""

    def __init__(self, pp=(0, 2), dp=(0, 2), tp=(0, 2)):
        self.pp, self.dp, self.tp = pp, dp, tp

    def get_pipeline_model_parallel_rank(self):
        return self.pp[0]

    def get_pipeline_model_parallel_world_size(self):
        return self.pp[1]

    def get_data_parallel_rank(self):
        return self.dp[0]

    def get_data_parallel_world_size(self):
        return self.dp[1]

    def get_model_parallel_rank(self):
        return self.tp[0]

    def get_model_parallel_world_size(self):
        return self.tp[1]


TOPO = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)


@pytest.mark.parametrize("raw, match", [
    ({"tensor_parallel": {"tp": {"tp_size": 4}}}, "tensor_parallel size 4 .*\\('model'\\) degree of 2"),
    ({"tensor_parallel": {"autotp_size": 2}}, "autotp_size with a PipelineModule"),
    ({"sequence_parallel_size": 2}, "sequence_parallel_size > 1 with a PipelineModule"),
])
def test_config_disagreeing_with_the_topology_is_refused(raw, match):
    with pytest.raises(ValueError, match=match):
        pipeline_mpu(_Module(TOPO), raw)


def test_config_tp_without_a_model_axis_names_the_topology_to_use():
    from deepscale.pipe import PipeDataParallelTopology
    with pytest.raises(ValueError, match="PipeModelDataParallelTopology"):
        pipeline_mpu(_Module(PipeDataParallelTopology(num_pp=1, num_dp=1)), {"tensor_parallel": {"tp": {"tp_size": 2}}})


def test_mpu_layout_checked_axis_by_axis():
    check_mpu_layout(_Mpu(), TOPO)  # agrees: no error
    with pytest.raises(ValueError, match="model coordinate 0 of 4, but .* at 0 of 2"):
        check_mpu_layout(_Mpu(tp=(0, 4)), TOPO)
    with pytest.raises(ValueError, match="data coordinate 1 of 2"):
        check_mpu_layout(_Mpu(dp=(1, 2)), TOPO)
    with pytest.raises(TypeError, match="2 stages but the mpu .* get_pipe_parallel_world_size"):
        check_mpu_layout(object(), TOPO)
