"""PyTorch reference of jaxrecover's single-layer recovery (the paper's own stack: torch + HF hooks).

Used by ``tests/test_torch_reference.py`` (numerical parity with the JAX engine) and
``benchmarks/bench_recovery.py`` (speed). Needs ``torch`` and ``transformers`` (the ``[torch]`` extra).
"""

from benchmarks.torch_reference.recovery import (
    TorchClamp as TorchClamp,
    TorchExamples as TorchExamples,
    TorchRecovery as TorchRecovery,
    TorchRecoveryConfig as TorchRecoveryConfig,
    TorchSAE as TorchSAE,
    TorchWindow as TorchWindow,
    load_hf_model as load_hf_model,
    make_batched_logits as make_batched_logits,
    null_projector as null_projector,
    parse_site as parse_site,
    plan_window as plan_window,
    prefix_kv as prefix_kv,
    recover_batched as recover_batched,
    recover_per_example as recover_per_example,
    run_from as run_from,
    run_to as run_to,
    site_hooks as site_hooks,
)
