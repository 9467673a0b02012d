"""lorasum: modular learning by naive LoRA summation (Cao, Truong & Lizarraga)."""

__version__ = "0.1.0"
