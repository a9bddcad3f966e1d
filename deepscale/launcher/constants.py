"""Defaults and names shared by the launcher modules."""

DEFAULT_HOSTFILE = "/job/hostfile"
DEFAULT_MASTER_PORT = 29500
DEFAULT_LAUNCHER = "pdsh"

PDSH = "pdsh"
SSH = "ssh"
OPENMPI = "openmpi"
MPICH = "mpich"
SLURM = "slurm"
LAUNCHERS = (PDSH, SSH, OPENMPI, MPICH, SLURM)

# Environment variables whose names start with one of these are exported to every rank
# on every node, so the caller's communication/threading/python settings apply everywhere.
EXPORT_ENV_PREFIXES = ("NCCL_", "PYTHON", "CUDA_", "OMP_", "MKL_", "GLOO_", "TORCH_", "UCX_", "MV2_",
                       "FI_", "DEEPSCALE_")
# Never exported: they describe the caller's own process or node, not the job.
EXPORT_ENV_EXCLUDE = ("CUDA_VISIBLE_DEVICES", "DEEPSCALE_ENV_FILE", "DEEPSCALE_SSH_ARGS",
                      "DEEPSCALE_CONTROLLER_ADDR", "DEEPSCALE_CONTROLLER_PORT")
ENV_FILE_NAMES = (".deepscale_env", ".deepspeed_env")
# DeepSpeed's name for the env file (Accelerate imports it to write exports for multi-node jobs).
DEEPSPEED_ENVIRONMENT_NAME = ENV_FILE_NAMES[1]
ENV_FILE_VAR = "DEEPSCALE_ENV_FILE"

# Extra ssh options for every ssh-based launcher (ssh, pdsh, OpenMPI, MPICH).
SSH_ARGS_VAR = "DEEPSCALE_SSH_ARGS"
CONTROLLER_ADDR_VAR = "DEEPSCALE_CONTROLLER_ADDR"
CONTROLLER_PORT_VAR = "DEEPSCALE_CONTROLLER_PORT"
KILL_GRACE_VAR = "DEEPSCALE_KILL_GRACE_S"
PID_DIR_VAR = "DEEPSCALE_PID_DIR"
RESTART_COUNT_VAR = "DEEPSCALE_RESTART_COUNT"

DEFAULT_KILL_GRACE_S = 3.0
DEFAULT_PID_DIR = "/tmp"
POLL_INTERVAL_S = 0.05
TAIL_LINES = 20
