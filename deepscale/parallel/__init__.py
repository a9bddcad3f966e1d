"""Tensor-parallel building blocks. ``random``: the model-parallel RNG tracker."""
