"""Mixture of experts (DeepSpeed's ``deepspeed.moe``): the :class:`~deepscale.moe.layer.MoE` layer
(``layer.py``), its gates (``gating.py``), experts (``experts.py``) and expert-parallel dispatch
(``sharded_moe.py``), and the parameter helpers optimizers import (``utils.py``)."""
