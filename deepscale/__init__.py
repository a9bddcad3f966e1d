"""deepscale: a PyTorch training engine with DeepSpeed-compatible configs and calls."""
from deepscale.version import __version__
