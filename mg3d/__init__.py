"""mg3d: medical image grounding in 3D volumes and 2D radiographs, trained with GRPO."""

__version__ = "0.1.0"
