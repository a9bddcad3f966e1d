"""Mixed-precision support: loss scaling and low-precision training with fp32 master weights."""
