"""Data files shipped with jaxrecover (prompt sets, IOI word lists, MCQs, TPP bios); read them via `jaxrecover.datasets`."""
