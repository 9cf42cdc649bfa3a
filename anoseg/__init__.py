"""anoseg: anomaly segmentation trials (data, backbones, heads, metrics) for architecture search."""
from __future__ import annotations

__version__ = "0.1.0"
