"""CPU and NVMe offload of ZeRO states (ZeRO-Offload, ZeRO-Infinity)."""
