"""Checkpoint save and load: atomic directory writes and the engine's state layout."""
from deepscale.runtime.checkpoint.atomic import AtomicCheckpointDir, read_latest_tag, write_latest_tag

__all__ = ["AtomicCheckpointDir", "read_latest_tag", "write_latest_tag"]
