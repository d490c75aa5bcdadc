"""Data sets of the accuracy suites: ImageNet-style classification and ADE20K-style segmentation subsets, and a
generator that writes small data sets in exactly those layouts (real JPEG/PNG files)."""

from .ade20k import ADE20KSubset, SegmentationTransform
from .colour_pointer import write_colour_pointer
from .errors import DataError
from .generate import write_ade20k_like, write_imagenet_like, write_relation_proxy
from .imagenet import ImageNetSubset

# dataset name (a suite's data.dataset) -> the generator that writes a small data set in its layout
GENERATORS = {"imagenet": write_imagenet_like, "relation_proxy": write_relation_proxy, "ade20k": write_ade20k_like,
              "colour_pointer": write_colour_pointer}


def prepare_data(data: dict) -> None:
    """Write the generated data set a suite asks for at ``data['root']`` (kept if already complete there)."""
    if data.get("generate") is not None:
        GENERATORS[data["dataset"]](data["root"], **data["generate"], seed=data.get("seed", 0))

__all__ = ["GENERATORS", "ADE20KSubset", "DataError", "ImageNetSubset", "SegmentationTransform", "prepare_data",
           "write_ade20k_like", "write_colour_pointer", "write_imagenet_like", "write_relation_proxy"]
