"""``deepscale.pipe``: DeepSpeed's public path for pipeline parallelism (``deepspeed.pipe``).

A thin re-export of :mod:`deepscale.runtime.pipe`.
"""
from deepscale.runtime.pipe import *  # noqa: F401,F403
from deepscale.runtime.pipe import __all__  # noqa: F401
