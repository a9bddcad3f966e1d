"""Mixture of experts (DeepSpeed's ``deepspeed.moe``). ``deepscale.moe.utils`` holds the
parameter helpers optimizers and tutorials import; the MoE layer itself is not built yet."""
