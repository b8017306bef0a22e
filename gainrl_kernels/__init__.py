"""gainrl_kernels: exact O(L·d) angle-concentration kernels (Triton, C++, CUDA) as torch ops for GAIN-RL."""
from .api import angle_concentration, angle_stats, whole_sequence_offsets
from .extension import EXTENSION_ERROR
from .types import AngleConcentration, AngleStats

__all__ = [
    "AngleConcentration",
    "AngleStats",
    "EXTENSION_ERROR",
    "angle_concentration",
    "angle_stats",
    "whole_sequence_offsets",
]
