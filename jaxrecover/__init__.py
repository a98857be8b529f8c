"""jaxrecover: post-intervention recovery stress tests for SAE feature clamps, in JAX.

The public surface is small; everything else lives in its module (``jaxrecover.model.transformer``,
``jaxrecover.model.generate``, ``jaxrecover.recover.projections``, ...). See the README's "Python API".

>>> import jaxrecover as jxr
>>> model, tok = jxr.load_default()                                   # SmolLM2-135M-Instruct
>>> sae = jxr.load_sae(jxr.shipped_sae(9))
>>> clamps = {jxr.Site.parse(sae.hook_name): jxr.Clamp(sae, features, values, mode="floor")}
>>> examples = jxr.teacher_forced(tok, prompts, answers)
>>> solver = jxr.make_solver(jxr.RecoveryProblem(site, tuple(clamps)), jxr.RecoveryConfig(budget=20.0),
...                          jxr.objectives.continuation_logprob, jxr.objectives.continuation_success)
>>> result = jxr.solve_batch(solver, model, examples, clamps)
"""

from jaxrecover._version import __version__ as __version__
from jaxrecover.core.sites import Site as Site
from jaxrecover.io.embedded import load_default as load_default
from jaxrecover.io.hf import load_transformer as load_transformer
from jaxrecover.io.shipped import shipped_sae as shipped_sae
from jaxrecover.model.generate import generate as generate
from jaxrecover.model.transformer import forward as forward
from jaxrecover.recover import objectives as objectives
from jaxrecover.recover.batch import run_recovery as run_recovery, solve_batch as solve_batch
from jaxrecover.recover.examples import teacher_forced as teacher_forced
from jaxrecover.recover.solver import (
    EncoderNull as EncoderNull,
    Example as Example,
    JacobianNull as JacobianNull,
    RecoveryConfig as RecoveryConfig,
    RecoveryProblem as RecoveryProblem,
    RecoveryResult as RecoveryResult,
    Unconstrained as Unconstrained,
    make_solver as make_solver,
)
from jaxrecover.sae.clamp import AddDelta as AddDelta, Clamp as Clamp, compose as compose
from jaxrecover.sae.files import load_sae as load_sae
