"""Prototypes for the contrastive losses: the image-prototype bank and the text prototypes."""

from .bank import PrototypeBank
from .conch import ConchTokenizer, build_conch_text_tower
from .text import (FixedTextPrototypes, PromptTextPrototypes, RandomTextPrototypes, TextPrototypes,
                   build_text_prototypes, build_text_tower)

__all__ = ["PrototypeBank", "TextPrototypes", "PromptTextPrototypes", "FixedTextPrototypes", "RandomTextPrototypes",
           "build_text_prototypes", "build_text_tower", "build_conch_text_tower", "ConchTokenizer"]
