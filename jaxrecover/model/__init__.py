"""Layer 3: the pure-function transformer (``transformer``), its config, tokenizer and batched generation. Imports ``core``, ``runtime``."""
