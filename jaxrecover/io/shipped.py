"""The SAEs this project trains and ships for the embedded default model (``sae_weights/`` at the
top of the repository; installed as ``jaxrecover/sae_weights`` inside a wheel).

Releases (``shipped_sae(layer, point, release)``; ``release`` is a folder name or one of the short
names in ``RELEASES``):
- ``"topk"`` = ``smollm2-135m-instruct-res`` (``shipped_sae``'s default folder): TopK SAEs at
  layers 9 and 15.
- ``"jumprelu"`` = ``smollm2-135m-instruct-res-jumprelu``: a JumpReLU SAE at layer 9 (exact
  encoder-null property: perturbations in the null space of the clamped encoder columns leave those
  latents unchanged, which TopK cannot promise). The experiments' default (``--sae-release``), as
  the paper's Gemma Scope SAEs are JumpReLU.

Lookup order: ``$JAXRECOVER_SAE_WEIGHTS``, the wheel's package folder, the source checkout.
"""

import os
from pathlib import Path

RELEASE = "smollm2-135m-instruct-res"
JUMPRELU_RELEASE = "smollm2-135m-instruct-res-jumprelu"
RELEASES = {"topk": RELEASE, "jumprelu": JUMPRELU_RELEASE}  # short name -> release folder
ENV = "JAXRECOVER_SAE_WEIGHTS"

_MSG_MISSING = (
    "Shipped SAE {name} not found. Looked in: {where}. Set ${env} to a folder holding "
    "<release>/<hook_name>/ SAELens folders, or pass an SAE path explicitly."
)


def sae_weights_roots() -> list[Path]:
    """Candidate ``sae_weights`` folders, in lookup order."""
    here = Path(__file__).resolve().parents[1]  # the jaxrecover package folder
    roots = [Path(os.environ[ENV])] if os.environ.get(ENV) else []
    return roots + [here / "sae_weights", here.parent / "sae_weights"]


def release_folder(release: str) -> str:
    """The release folder name of ``release`` (a short name in ``RELEASES`` or a folder name)."""
    return RELEASES.get(release, release)


def shipped_sae(layer: int, point: str = "resid_post", release: str = RELEASE) -> Path:
    """The folder of the shipped SAE at ``blocks.{layer}.hook_{point}`` (raises if absent).

    >>> shipped_sae(9, release="jumprelu").parent.name
    'smollm2-135m-instruct-res-jumprelu'
    """
    name = f"{release_folder(release)}/blocks.{layer}.hook_{point}"
    if os.environ.get(ENV) and not Path(os.environ[ENV]).is_dir():  # a typo must not fall back silently
        raise FileNotFoundError(f"${ENV}={os.environ[ENV]!r} is not a folder; unset it or point it at a folder of "
                                "<release>/<hook_name>/ SAELens folders.")
    for root in sae_weights_roots():
        if (root / name / "cfg.json").is_file():
            return root / name
    raise FileNotFoundError(_MSG_MISSING.format(name=name, where=", ".join(map(str, sae_weights_roots())), env=ENV))
