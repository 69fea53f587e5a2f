"""Prototypes for the contrastive losses: the image-prototype bank and the text prototypes (whose frozen text
towers are networks, in ``scripts.networks``)."""

from .bank import PrototypeBank
from .text import FixedTextPrototypes, PromptTextPrototypes, RandomTextPrototypes, TextPrototypes, build_text_prototypes

__all__ = ["PrototypeBank", "TextPrototypes", "PromptTextPrototypes", "FixedTextPrototypes", "RandomTextPrototypes",
           "build_text_prototypes"]
