"""Layer 2: prompt sets and corpora (``datasets``, ``corpus``) and the data files shipped with jaxrecover (prompt sets, IOI word lists, MCQs, TPP bios, the SAE registry). Imports ``core``."""
