"""Backbones, side-info encoder, transformation (each with its typed config), and the artefact registry."""
from .backbone import Classifier, ClassifierConfig, ResNet, ResNetConfig, SimCLR, SimCLRConfig
from .transformation import Transformation, TransformationConfig

__all__ = ["Classifier", "ClassifierConfig", "ResNet", "ResNetConfig", "SimCLR", "SimCLRConfig",
           "Transformation", "TransformationConfig"]
