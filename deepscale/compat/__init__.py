"""Compatibility layers for DeepSpeed clients (the ``deepspeed`` import alias used by the shim)."""
