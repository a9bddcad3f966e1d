"""The ``deepscale`` command line launcher.

``runner`` is the CLI (``deepscale ...``): it reads the hostfile, picks the nodes and
slots, and starts one per-node launcher (``launch``) on each node through pdsh, ssh,
OpenMPI, MPICH or Slurm. The per-node launcher starts the local ranks with the
``spawner``. Nothing here imports torch or ``deepscale.runtime``, so the CLI starts fast
and works where torch is broken.
"""
