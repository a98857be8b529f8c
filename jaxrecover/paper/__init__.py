"""The paper's experiments, as settings of the package (so a wheel runs them): each module defines a
frozen ``Config`` dataclass (every field is a CLI option, same names across settings where the idea
is the same) and ``main(cfg) -> dict``. ``jaxrecover run NAME`` looks names up here only; it never
executes files from the current folder.

========================  ==================================================================
``refusal``               refusal steering recovery (paper section 6; the main job)
``ioi``                   IOI circuit ablation recovery (logit difference)
``unlearning``            SAE unlearning on bio MCQs (answer log-prob)
``tpp``                   targeted probe perturbation (linear probe readout)
``sweeps``                K and budget sweeps for every setting (ioi, unlearning, tpp, refusal)
``defences``              stronger defences (splice, multi-layer, dense, recovery-aware game) vs recovery
``all``                   every setting at its defaults, then one REPORT.md with a verdict per claim
========================  ==================================================================
"""

import importlib
from types import ModuleType

SETTINGS = {
    name: f"jaxrecover.paper.{name}"
    for name in ("refusal", "ioi", "unlearning", "tpp", "sweeps", "defences", "all")
}


def load(name: str) -> ModuleType:
    """The setting module ``name`` (ValueError naming the known ones otherwise)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(SETTINGS)}.")
    return importlib.import_module(SETTINGS[name])
