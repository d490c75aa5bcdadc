"""Models: BiFormer-T/S/B as published, the BiFormer-STL ablation backbone with swappable attention, and the
architecture-ablation path; all registered with timm (``timm.create_model("biformer_tiny")``)."""

from . import biformer, biformer_stl, proxy  # noqa: F401  (registers the models with timm)
from .checkpoint import load_backbone_checkpoint, load_checkpoint

__all__ = ["load_backbone_checkpoint", "load_checkpoint"]
