"""jaxrecover: post-intervention recovery stress tests for SAE feature clamps, in JAX."""

from jaxrecover.config import TransformerConfig as TransformerConfig, from_hf_config as from_hf_config
from jaxrecover.sites import Site as Site
from jaxrecover.transformer import (
    Transformer as Transformer,
    forward as forward,
    run_blocks as run_blocks,
    run_from as run_from,
    run_to as run_to,
)
