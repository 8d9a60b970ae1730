"""Backbones, side-info encoder, transformation, and the artefact registry."""
from .backbone import Classifier, ResNet, SimCLR
from .transformation import Transformation

__all__ = ["Classifier", "ResNet", "SimCLR", "Transformation"]
