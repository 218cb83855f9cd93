"""memit_fast: mass-editing of facts in transformer language models (MEMIT), fast on GPUs."""

__version__ = "0.1.0"
