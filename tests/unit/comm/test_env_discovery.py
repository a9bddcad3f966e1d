"""Rank discovery from each launcher's environment variables."""
import pytest

from deepscale.comm.env_discovery import _first_slurm_host, discover


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "n0",
      "MASTER_PORT": "1234"}, (3, 8, 1, 2, "n0", 1234, "env")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, (1, 2, 1, 2, None, None, "env")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, (5, 6, 2, 3, None, None, "openmpi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "h"},
     (2, 4, 0, 2, "h", None, "mpich")),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_TASKS_PER_NODE": "4(x2)",
      "SLURM_JOB_NODELIST": "gpu[03-04]"}, (7, 8, 3, 4, "gpu03", None, "slurm")),
    ({}, (0, 1, 0, 1, None, None, "single")),
])
def test_discover(env, expected):
    got = discover(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_size, got.master_addr, got.master_port,
            got.source) == expected


def test_bad_integer_names_variable():
    with pytest.raises(ValueError, match="RANK='x'"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist,host", [("node[01-04,07],gpu3", "node01"), ("solo", "solo"),
                                           ("a,b", "a"), ("", None)])
def test_first_slurm_host(nodelist, host):
    assert _first_slurm_host(nodelist) == host
