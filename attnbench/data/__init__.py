"""Data sets of the accuracy suites: ImageNet-style classification and ADE20K-style segmentation subsets, and a
generator that writes small data sets in exactly those layouts (real JPEG/PNG files)."""

from .ade20k import ADE20KSubset, SegmentationTransform
from .errors import DataError
from .generate import write_ade20k_like, write_imagenet_like, write_relation_proxy
from .imagenet import ImageNetSubset

__all__ = ["ADE20KSubset", "DataError", "ImageNetSubset", "SegmentationTransform", "write_ade20k_like",
           "write_imagenet_like", "write_relation_proxy"]
