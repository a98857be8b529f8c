"""Layer 7: the one experiment driver (``driver``: Setting / Case / Method, budgets, records, controls, replays, resume store, outputs) and what settings share (``common``, ``suite``)."""
