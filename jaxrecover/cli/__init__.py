"""Layer 9 (top): the ``jaxrecover`` command line (``app``) and ``jaxrecover inspect``."""
