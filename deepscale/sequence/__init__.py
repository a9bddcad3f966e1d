"""DeepSpeed's ``deepspeed.sequence`` path: Ulysses sequence parallelism (lives in ``deepscale.parallel.ulysses``)."""
