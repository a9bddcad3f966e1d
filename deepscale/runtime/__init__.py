"""The training runtime: engine, precision, optimizers, ZeRO, checkpoints, pipeline."""
