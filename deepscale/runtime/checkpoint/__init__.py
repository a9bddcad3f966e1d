"""Checkpoint save and load: atomic directory writes and the engine's state layout."""
from deepscale.runtime.checkpoint.atomic import (AtomicCheckpointDir, read_latest_tag, remove_stale_staging,
                                                 write_latest_tag)
from deepscale.runtime.checkpoint.engine_checkpoint import CheckpointSaveError
from deepscale.utils.checkpoint_files import CheckpointDiskFullError, CorruptCheckpointError

__all__ = ["AtomicCheckpointDir", "CheckpointDiskFullError", "CheckpointSaveError", "CorruptCheckpointError",
           "read_latest_tag", "remove_stale_staging", "write_latest_tag"]
