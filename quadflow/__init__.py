"""quadflow: select language-model training data within a token budget (Quad, ICLR 2025)."""

__version__ = "0.1.0"
