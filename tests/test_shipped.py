"""Shipped SAE lookup: releases by short name or folder name, env override, loud failure."""

import pytest

from jaxrecover.io import shipped as shipped
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.sae.files import load_sae


def _fake_release(root, release: str, hook: str) -> None:
    folder = root / release / hook
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")


def test_short_names_resolve_to_release_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(shipped.ENV, str(tmp_path))
    _fake_release(tmp_path, shipped.JUMPRELU_RELEASE, "blocks.9.hook_resid_post")
    _fake_release(tmp_path, shipped.RELEASE, "blocks.9.hook_resid_post")
    jr = shipped.shipped_sae(9, release="jumprelu")
    assert jr == tmp_path / shipped.JUMPRELU_RELEASE / "blocks.9.hook_resid_post"
    assert shipped.shipped_sae(9, release=shipped.JUMPRELU_RELEASE) == jr  # the folder name works too
    assert shipped.shipped_sae(9).parent.name == shipped.RELEASE  # default release unchanged (TopK)
    assert shipped.shipped_sae(9, release="topk") == shipped.shipped_sae(9)
    with pytest.raises(FileNotFoundError, match="res-jumprelu/blocks.15.hook_resid_post"):
        shipped.shipped_sae(15, release="jumprelu")


def test_jumprelu_release_is_shipped_and_loads(monkeypatch):
    monkeypatch.delenv(shipped.ENV, raising=False)
    sae = load_sae(shipped.shipped_sae(9, release="jumprelu"))
    assert isinstance(sae, SAE)
    assert sae.activation == "jumprelu" and sae.threshold is not None
    assert sae.hook_name == "blocks.9.hook_resid_post" and sae.W_enc.shape[0] == 576


def test_run_config_sae_release_resolves_or_names_the_problem():
    import pytest

    from jaxrecover.paper import ioi

    cfg = ioi.Config()  # JumpReLU is the default release, resolved to an explicit path
    assert len(cfg.sae) == 1 and "smollm2-135m-instruct-res-jumprelu/blocks.9.hook_resid_post" in cfg.sae[0]
    assert ioi.Config(sae_release="topk").sae == ()  # TopK stays implicit (the loaders' shipped fallback)
    assert ioi.Config(sae_release="topk", layers=(15,)).layers == (15,)
    with pytest.raises(ValueError, match="jumprelu --layers 15.*topk ships layers 9 and 15"):
        ioi.Config(layers=(15,))
    with pytest.raises(ValueError, match="--sae-release .relu.: expected topk"):
        ioi.Config(sae_release="relu")


def test_experiments_compute_the_shipped_bf16_saes_in_float32():
    # encode runs in the SAE's dtype: a bf16 encoder rounds its input to 8 bits, and encoder-null
    # latents that did not move then read as ~1e-2 relative drift
    import jax.numpy as jnp

    from jaxrecover.experiment import common as C
    from jaxrecover.experiment import suite as S

    path = str(shipped.shipped_sae(9, release="jumprelu"))
    (sae,) = C.load_saes((path,), (9,)).values()
    assert sae.W_enc.dtype == jnp.float32 and sae.threshold.dtype == jnp.float32
    assert S.resolve_sae(path, 9)[1].W_enc.dtype == jnp.float32
