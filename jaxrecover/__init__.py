"""jaxrecover: post-intervention recovery stress tests for SAE feature clamps, in JAX.

>>> import jaxrecover as jxr
>>> model, tok = jxr.load_default()                                   # SmolLM2-135M-Instruct
>>> sae = jxr.load_sae("sae_weights/smollm2-135m-instruct-res/blocks.9.hook_resid_post")
>>> clamp = jxr.Clamp(sae, features, values, mode="scale")           # the defence
>>> solve = jxr.make_recover(jxr.RecoveryProblem(jxr.Site(9, "resid_post"), (jxr.Site(9, "resid_post"),)),
...                          jxr.RecoveryConfig(budget=20.0), jxr.objectives.logit_diff, jxr.objectives.logit_diff_success)
"""

from jaxrecover import objectives as objectives, surgery as surgery, testing as testing
from jaxrecover.config import TransformerConfig as TransformerConfig, from_hf_config as from_hf_config
from jaxrecover.embedded import (
    DEFAULT_MODEL_NAME as DEFAULT_MODEL_NAME,
    GGUF_SHA256 as GGUF_SHA256,
    default_model_dir as default_model_dir,
    load_default as load_default,
)
from jaxrecover.generate import GenerationResult as GenerationResult, generate as generate
from jaxrecover.gguf_convert import GGUFError as GGUFError, gguf_to_hf_folder as gguf_to_hf_folder
from jaxrecover.interventions import (
    AddDelta as AddDelta,
    Clamp as Clamp,
    Identity as Identity,
    clamp_latents as clamp_latents,
    compose as compose,
    reencoding_error as reencoding_error,
)
from jaxrecover.io_hf import CheckpointError as CheckpointError, load_transformer as load_transformer, save_transformer as save_transformer
from jaxrecover.metrics import bootstrap_mean_ci as bootstrap_mean_ci, summarize as summarize, wilson_interval as wilson_interval
from jaxrecover.objectives import Readout as Readout, Task as Task
from jaxrecover.projections import (
    EncoderNullProjector as EncoderNullProjector,
    clip_l2 as clip_l2,
    encoder_null_projector as encoder_null_projector,
    jacobian_null_project as jacobian_null_project,
    projected_params as projected_params,
    projected_updates as projected_updates,
)
from jaxrecover.recovery import (
    Example as Example,
    RecoveryConfig as RecoveryConfig,
    RecoveryProblem as RecoveryProblem,
    RecoveryResult as RecoveryResult,
    make_recover as make_recover,
    make_solver as make_solver,
    run_recovery as run_recovery,
    solve_batch as solve_batch,
)
from jaxrecover.sae import SAE as SAE, decode as decode, encode as encode, encode_features as encode_features, reconstruct as reconstruct
from jaxrecover.sae_io import SAEFormatError as SAEFormatError, load_sae as load_sae, save_sae as save_sae
from jaxrecover.sharding import batch_sharding as batch_sharding, pad_batch as pad_batch, shard_batch as shard_batch
from jaxrecover.sites import Site as Site
from jaxrecover.tokenizer import (
    TextTokenizer as TextTokenizer,
    apply_chat_template as apply_chat_template,
    encode_batch as encode_batch,
    load_tokenizer as load_tokenizer,
)
from jaxrecover.transformer import (
    Transformer as Transformer,
    forward as forward,
    run_blocks as run_blocks,
    run_from as run_from,
    run_to as run_to,
)
