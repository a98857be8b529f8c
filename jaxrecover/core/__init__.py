"""Layer 0: the types everything shares (``Site`` names, pytree helpers, small process helpers). Imports nothing of jaxrecover."""
