"""``deepscale.checkpointing``: DeepSpeed's public path for activation checkpointing.

A thin re-export of :mod:`deepscale.runtime.activation_checkpointing`.
"""
from deepscale.runtime.activation_checkpointing import *  # noqa: F401,F403
from deepscale.runtime.activation_checkpointing import __all__  # noqa: F401
