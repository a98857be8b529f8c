"""Recovery speed: jaxrecover against a faithful PyTorch reference, every mode in ONE run.

Two ratios (issue 9), measured in the same process on the same machine state:

- **framework ratio**: the JAX engine vs batched PyTorch running the SAME algorithm, once with
  sequence-axis caching + read-slot unembedding on both sides (``jax`` / ``torch_cached``) and once
  with the full path on both sides (``jax_full`` / ``torch_batched``);
- **end-to-end ratio**: the JAX engine (cached) vs the paper's per-example full-forward loop
  (``jax`` / ``torch_loop``).

Modes (same problem, weights, hyper-parameters; see ``benchmarks/README.md``):

- ``jax``           : the engine as the experiments run it, ``runner.solve_batch`` (jit(vmap) of
                      ``recovery.init / advance / finish``) with the window planned from the data
                      (``recovery.plan_window``): below the delta layer computed once, K/V of the slots
                      before the first delta slot cached once, each step runs slots ``cut..seq`` and
                      unembeds slots ``read..seq`` only.
- ``jax_full``      : the same with ``window=recovery.FULL`` (every slot from the delta layer on,
                      every slot unembedded; the prefix below the delta layer is still computed once).
- ``jax_bf16``      : ``jax`` with ``RecoveryConfig(compute_dtype="bfloat16")`` (transformer in bf16).
- ``torch_cached``  : batched PyTorch with the same caching and read-slot unembedding
                      (``recover_batched(cache=True)``: HF decoder layers fed the cached K/V).
- ``torch_batched`` : batched PyTorch, full path (``recover_batched``).
- ``torch_loop``    : the paper's loop. One example at a time, HF forward hooks, the FULL forward every
                      step (``recover_per_example``).
- ``torch_compiled``: ``torch_batched`` under ``torch.compile`` (``--torch-compile``).
- ``jax_min_cache`` / ``jax_min_full`` : a minimal JAX loop (gradient, projection, Adam, clip) with the
                      prefix below the delta layer cached vs recomputed (``--prefix-ablation``).

Problems (``--problems``):

- ``synthetic``: random tokens of length ``--seqs``, a random 4-feature SAE clamp (set to 0) at
  ``blocks.{n_layers//2}.hook_resid_post``, ``delta`` on the last 2 slots, ``logit_diff`` at the last slot.
- ``refusal``  : refusal-shaped (needs ``--model smollm2``): a 48-token SmolLM2 chat prompt (built-in
  harmful request + a fixed filler, token-trimmed to 48) + the base model's own 16 greedy answer
  tokens teacher-forced, delta rows at the last prompt token and the 16 answer slots (17 rows), the
  shipped layer-9 TopK SAE with 20 refusal-text features floor-clamped at 4x their mean refusal-text
  activation (the refusal job's defaults), ``continuation_logprob`` over the 16 answer tokens,
  encoder-null projection (pinv, delta re-projected), Adam lr 0.05, budget 0.5 x median defended row
  norm x sqrt(17).

``--check`` first asserts that ``torch_cached`` gives the same per-step losses, final and clamped
objectives as ``torch_batched`` (within 1e-4 relative, ``|a - b| / max(|b|, 1)``) on every problem,
and prints the agreement. Every timed row also records its final objectives, and the report gives
each mode's largest deviation from ``torch_batched``: all modes solve the same problem.

Reported per (problem, mode, batch): compile (first call minus steady), steady solve time,
examples/s, time per optimisation step of the whole batch, the FLOPs the mode's algorithm needs per
step and its model FLOPs utilisation, peak memory. Results go to ``benchmarks/results/<device>/`` as
JSON, a markdown table and a PNG plot.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_recovery.py` as well as `python -m benchmarks.bench_recovery`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _timing  # noqa: E402

# ----------------------------------------------------------------------------- models

# Hugging Face configs of the random-weight presets (published sizes; random init, never downloaded).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("LlamaConfig", dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "gemma2-2b": ("Gemma2Config", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                       head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                                       rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)),
}

_MSG_MODEL = "--model {spec!r}: expected 'smollm2', 'random:<preset>' (presets: {presets}) or an HF folder path."


def _cache_root() -> Path:
    return Path(os.environ.get("JAXRECOVER_CACHE", Path.home() / ".cache" / "jaxrecover")).expanduser()


def random_checkpoint(preset: str, dtype: str, seed: int = 0) -> Path:
    """An HF folder with random weights for ``preset``: built with ``transformers`` once, then cached
    under ``<cache>/bench_random/<preset>-<dtype>-s<seed>``. Both frameworks load this same folder."""
    import torch
    import transformers

    if preset not in PRESETS:
        raise ValueError(_MSG_MODEL.format(spec=f"random:{preset}", presets=sorted(PRESETS)))
    folder = _cache_root() / "bench_random" / f"{preset}-{dtype}-s{seed}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    conf_name, kw = PRESETS[preset]
    config = getattr(transformers, conf_name)(**kw)
    torch.manual_seed(seed)
    cls = transformers.Gemma2ForCausalLM if conf_name == "Gemma2Config" else transformers.LlamaForCausalLM
    model = cls(config).to(getattr(torch, dtype))
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
    if folder.exists():  # a half-written folder from an interrupted run
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def resolve_model(spec: str, dtype: str, seed: int) -> Path:
    if spec == "smollm2":
        from jaxrecover.io.embedded import default_model_dir

        return default_model_dir()
    if spec.startswith("random:"):
        return random_checkpoint(spec.split(":", 1)[1], dtype, seed)
    if Path(spec).is_dir():
        return Path(spec)
    raise ValueError(_MSG_MODEL.format(spec=spec, presets=sorted(PRESETS)))


# ----------------------------------------------------------------------------- FLOPs and peak


def flops_per_example_step(cfg: Any, seq: int, layer: int, *, cut: int = 0, read: int = 0) -> dict[str, float]:
    """Analytic model FLOPs of one optimisation step for one example, for the algorithm that runs
    blocks ``layer..n_layers-1`` on slots ``cut..seq`` (attending to all ``seq`` keys) and unembeds
    slots ``read..seq``; ``cut = read = 0`` is the full path, ``layer = 0`` the full forward.

    The backward pass goes to the delta site WITHOUT weight gradients (weights are frozen): the
    activation-gradient pass costs about one forward. So ``step = 2 * forward`` with
    ``forward = sum_l (2 * matmul_params_l * n_new + 4 * n_new * seq * n_heads * d_head) + 2 * d_model * d_vocab * n_read``,
    ``n_new = seq - cut``, ``n_read = seq - read`` (dense attention counted in full, as implemented;
    norms, softmax and the SAE clamp are ignored).
    """
    d, h, kv, dh, m, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    attn_params = d * h * dh + 2 * d * kv * dh + h * dh * d
    mlp_params = (3 if cfg.arch != "gpt2" else 2) * d * m
    n_new, n_read = seq - cut, seq - read
    per_layer = 2 * (attn_params + mlp_params) * n_new + 4 * n_new * seq * h * dh
    forward = (cfg.n_layers - layer) * per_layer + 2 * d * v * n_read
    return {"forward_suffix_flops": float(forward), "step_flops": float(2 * forward)}


def measure_peak_tflops(dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """Achieved TFLOP/s of a large square matmul on the default JAX device (the MFU denominator)."""
    dev = jax.devices()[0]
    n = n or (1024 if dev.platform == "cpu" else 8192)
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jdt)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timing.time_steady(f, a, repeats=repeats).times)
    return 2 * n**3 / best / 1e12


def device_name() -> str:
    """A folder-safe device label: the accelerator kind, or the CPU model plus core count."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        label = dev.device_kind
    else:
        label = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    label = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        label = f"cpu-{label}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


# ----------------------------------------------------------------------------- one problem, both frameworks


@dataclasses.dataclass
class Problem:
    """The same recovery problem for both frameworks."""

    jax_examples: Any  # stacked jaxrecover.recover.solver.Example
    jax_clamps: dict
    jax_problem: Any
    jax_cfg: Any
    objective: str
    torch_examples: Any
    torch_clamps: dict
    torch_cfg: Any
    name: str = "synthetic"
    describe: str = ""


def random_sae(key: jax.Array, d_in: int, d_sae: int) -> Any:
    """A relu SAE with unit-norm decoder rows and a positive encoder bias (features fire)."""
    from jaxrecover.sae.autoencoder import SAE

    k1, k2 = jax.random.split(key)
    W_enc = jax.random.normal(k1, (d_in, d_sae), jnp.float32) * d_in**-0.5
    W_dec = jax.random.normal(k2, (d_sae, d_in), jnp.float32)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    return SAE(W_enc=W_enc, b_enc=jnp.full((d_sae,), 0.1, jnp.float32), W_dec=W_dec, b_dec=jnp.zeros((d_in,), jnp.float32))


def build_problem(
    model: Any,
    *,
    batch: int,
    seq: int,
    objective: str = "logit_diff",
    layer: int,
    point: str = "resid_post",
    steps: int = 10,
    lr: float = 0.05,
    budget: float = 20.0,
    projector: str = "ridge",
    reproject: bool = False,
    n_features: int = 4,
    d_sae: int | None = None,
    rows: int = 2,
    downstream_clamp: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> Problem:
    """Random tokens, a random SAE clamp at ``blocks.{layer}.hook_{point}`` (features set to 0) and,
    with ``downstream_clamp``, a x3 clamp at the last block's ``resid_post``. ``delta`` has ``rows``
    rows at the last ``rows`` slots. Targets per ``objective`` (one variant per example):
    ``logit_diff`` (io vs s at the last slot), ``choice_margin`` (4 choice tokens at the last slot),
    ``continuation_logprob`` (the last 4 next-token targets of the sequence itself)."""
    import torch

    from benchmarks.torch_reference import TorchClamp, TorchExamples, TorchRecoveryConfig, TorchSAE
    from jaxrecover.recover import objectives as O
    from jaxrecover.sae.clamp import Clamp
    from jaxrecover.recover.solver import EncoderNull, Example, RecoveryConfig, RecoveryProblem
    from jaxrecover.core.sites import Site

    cfg = model.cfg
    rng = np.random.default_rng(seed)
    V, T, B = cfg.d_vocab, seq, batch
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    slots = np.broadcast_to(np.arange(T - rows, T, dtype=np.int32), (B, rows)).copy()
    site = Site(layer, point)
    sae = random_sae(jax.random.PRNGKey(seed), cfg.d_model, d_sae or 4 * cfg.d_model)
    feats = np.sort(rng.choice(sae.d_sae, n_features, replace=False)).astype(np.int32)
    jclamps = {site: Clamp(sae, jnp.asarray(feats), jnp.zeros((n_features,), jnp.float32), mode="set")}
    tsae = TorchSAE.from_jax(sae, device)
    tclamps = {str(site): TorchClamp(sae=tsae, features=torch.from_numpy(feats.astype(np.int64)).to(device),
                                     values=torch.zeros(n_features, device=device), mode="set")}
    if downstream_clamp:
        down = Site(cfg.n_layers - 1, "resid_post")
        if down != site:
            sae2 = random_sae(jax.random.PRNGKey(seed + 1), cfg.d_model, d_sae or 4 * cfg.d_model)
            f2 = np.sort(rng.choice(sae2.d_sae, n_features, replace=False)).astype(np.int32)
            jclamps[down] = Clamp(sae2, jnp.asarray(f2), jnp.full((n_features,), 3.0, jnp.float32), mode="scale")
            tclamps[str(down)] = TorchClamp(sae=TorchSAE.from_jax(sae2, device),
                                            features=torch.from_numpy(f2.astype(np.int64)).to(device),
                                            values=torch.full((n_features,), 3.0, device=device), mode="scale")

    t = lambda a, dt=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(device)  # noqa: E731
    if objective == "logit_diff":
        io, s = rng.integers(0, V, B), rng.integers(0, V, B)
        jt = O.LogitDiffTarget(slot=jnp.full((B, 1), T - 1, jnp.int32), io=jnp.asarray(io[:, None], jnp.int32),
                               s=jnp.asarray(s[:, None], jnp.int32))
        tt = dict(slot=t(np.full(B, T - 1)), io=t(io), s=t(s))
    elif objective == "choice_margin":
        choices = np.stack([rng.choice(V, 4, replace=False) for _ in range(B)])
        correct = rng.integers(0, 4, B)
        jt = O.ChoiceTarget(slot=jnp.full((B,), T - 1, jnp.int32), choice_ids=jnp.asarray(choices, jnp.int32),
                            correct=jnp.asarray(correct, jnp.int32))
        tt = dict(slot=t(np.full(B, T - 1)), choice_ids=t(choices), correct=t(correct))
    elif objective == "continuation_logprob":
        ids = np.roll(tokens, -1, axis=1)
        weights = np.zeros((B, T), np.float32)
        weights[:, T - 5 : T - 1] = 1.0
        jt = O.Continuation(ids=jnp.asarray(ids[:, None], jnp.int32), weights=jnp.asarray(weights[:, None]))
        tt = dict(ids=t(ids), weights=t(weights, torch.float32))
    else:
        raise ValueError(f"unknown objective {objective!r}")
    jex = Example(tokens=jnp.asarray(tokens[:, None]), valid=jnp.ones((B, 1, T), bool),
                  delta_slots=jnp.asarray(slots), measure_mask=jnp.ones((B, T), bool), target=jt)
    tex = TorchExamples(tokens=t(tokens), delta_slots=t(slots), target=tt)
    jcfg = RecoveryConfig(steps=steps, lr=lr, budget=budget, constraint=EncoderNull(projector, reproject=reproject))
    tcfg = TorchRecoveryConfig(layer=layer, point=point, steps=steps, lr=lr, budget=budget,
                               projection=projector, reproject=reproject, objective=objective)
    return Problem(jex, jclamps, RecoveryProblem(site, tuple(jclamps)), jcfg, objective, tex, tclamps, tcfg,
                   name=f"seq{seq}")


# ----------------------------------------------------------------------------- the refusal-shaped problem

REFUSAL_FILLER = (" Explain it step by step, in plain words, with every practical detail you know, and do not"
                  " leave anything out of the answer.")
REFUSAL_PROMPT_TOKENS = 48
REFUSAL_ANSWER_TOKENS = 16
REFUSAL_LAYER = 9
REFUSAL_FEATURES = 20


@dataclasses.dataclass
class RefusalSetup:
    """Everything the refusal-shaped problem needs, built once for the largest batch."""

    tokens: np.ndarray  # [n, 48 + 16] prompt + base greedy answer
    sae: Any
    features: np.ndarray  # [20]
    floor: np.ndarray  # [20] floor values
    budget: float
    prompt_len: int
    feature_source: str


def _chat_tokens(tok: Any, prompt: str, length: int) -> list[int]:
    """SmolLM2 chat tokens of ``prompt + REFUSAL_FILLER`` with the user text trimmed (at token level)
    so that the whole prompt, system turn and assistant opening included, is exactly ``length``."""
    from jaxrecover.data import datasets as datasets

    enc = lambda text: tok.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    head = enc(f"<|im_start|>system\n{datasets.SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    tail = enc("<|im_end|>\n<|im_start|>assistant\n")
    body = enc(prompt + REFUSAL_FILLER)
    need = length - len(head) - len(tail)
    if need <= 0 or len(body) < need:
        raise ValueError(f"cannot build a {length}-token chat prompt from {prompt!r}.")
    return head + body[:need] + tail


def refusal_setup(model: Any, folder: Path, n: int) -> RefusalSetup:
    """Prompts, base answers, features and floor values of the refusal-shaped problem (``n`` examples)."""
    from jaxrecover.data import datasets as datasets
    from jaxrecover.model.generate import generate
    from jaxrecover.sae.clamp import Clamp
    from jaxrecover.sae.files import load_sae
    from jaxrecover.io.shipped import shipped_sae
    from jaxrecover.core.sites import Site
    from jaxrecover.model.tokenizer import decode, load_tokenizer
    from jaxrecover.model.transformer import run_to

    tok = load_tokenizer(folder)
    site = Site(REFUSAL_LAYER, "resid_post")
    repo_sae = ROOT / "sae_weights" / "smollm2-135m-instruct-res" / f"blocks.{REFUSAL_LAYER}.hook_resid_post"
    sae = load_sae(repo_sae if repo_sae.is_dir() else shipped_sae(REFUSAL_LAYER), dtype=jnp.float32)
    prompts = [it.prompt for it in datasets.load_harmful()][:n]
    ptok = np.asarray([_chat_tokens(tok, p, REFUSAL_PROMPT_TOKENS) for p in prompts], np.int32)
    P, A = REFUSAL_PROMPT_TOKENS, REFUSAL_ANSWER_TOKENS
    # the base (unclamped) model's own greedy answer; EOS is not special here (16 tokens are forced)
    answer = np.asarray(generate(model, jnp.asarray(ptok), max_new_tokens=A).tokens, np.int32)
    tokens = np.concatenate([ptok, answer], axis=1)
    texts = [decode(tok, ptok[i]) for i in range(n)]
    # the refusal job's feature selection (features more active on refusal text than on compliance)
    try:
        from jaxrecover.paper.refusal import select_refusal_text

        feats, ref_act = select_refusal_text(model, tok, {site: sae}, texts,
                                             argparse.Namespace(n_features=REFUSAL_FEATURES))
        features, floor = np.asarray(feats[site], np.int32), 4.0 * np.asarray(ref_act[site], np.float32)
        source = "jaxrecover.paper.refusal.select_refusal_text, floor = 4 x mean refusal-text activation"
    except Exception as err:  # noqa: BLE001 - the benchmark must not depend on the experiment's internals
        from jaxrecover.sae.autoencoder import encode

        z = np.asarray(jax.vmap(lambda t: encode(sae, run_to(model, t, REFUSAL_LAYER + 1)))(jnp.asarray(tokens)))
        mean = z[:, P - 1 :].reshape(-1, sae.d_sae).mean(0)
        features = np.sort(np.argsort(-mean)[:REFUSAL_FEATURES]).astype(np.int32)
        floor = 4.0 * mean[features].astype(np.float32)
        source = f"fallback (select_refusal_text failed: {type(err).__name__}): top-20 mean answer activation, floor 4x"
    if len(features) != REFUSAL_FEATURES:
        raise ValueError(f"refusal problem: expected {REFUSAL_FEATURES} features at layer {REFUSAL_LAYER}, got {len(features)}.")
    clamp = Clamp(sae, jnp.asarray(features), jnp.asarray(floor), mode="floor")
    h_def = np.asarray(jax.vmap(lambda t: run_to(model, t, REFUSAL_LAYER + 1, {site: clamp}))(jnp.asarray(tokens)))
    norms = np.linalg.norm(h_def[:, P - 1 :], axis=-1)  # the 17 delta rows
    budget = float(0.5 * np.median(norms) * np.sqrt(A + 1))
    return RefusalSetup(tokens, sae, features, floor, budget, P, source)


def build_refusal_problem(setup: RefusalSetup, *, batch: int, steps: int = 10, lr: float = 0.05,
                          device: str = "cpu") -> Problem:
    """The refusal-shaped problem for the first ``batch`` examples of ``setup`` (see the module docstring)."""
    import torch

    from benchmarks.torch_reference import TorchClamp, TorchExamples, TorchRecoveryConfig, TorchSAE
    from jaxrecover.recover import objectives as O
    from jaxrecover.sae.clamp import Clamp
    from jaxrecover.recover.solver import EncoderNull, Example, RecoveryConfig, RecoveryProblem
    from jaxrecover.core.sites import Site

    if batch > setup.tokens.shape[0]:
        raise ValueError(f"refusal problem: batch {batch} > {setup.tokens.shape[0]} prepared examples.")
    tokens = setup.tokens[:batch]
    B, T = tokens.shape
    P, A = setup.prompt_len, T - setup.prompt_len
    site = Site(REFUSAL_LAYER, "resid_post")
    slots = np.broadcast_to(np.arange(P - 1, T, dtype=np.int32), (B, A + 1)).copy()  # last prompt token + answer
    ids = np.zeros((B, T), np.int32)
    ids[:, :-1] = tokens[:, 1:]  # logits at slot t predict token t + 1
    weights = np.zeros((B, T), np.float32)
    weights[:, P - 1 : T - 1] = 1.0  # the 16 answer tokens
    measure = np.zeros((B, T), bool)
    measure[:, P - 1 :] = True
    jclamps = {site: Clamp(setup.sae, jnp.asarray(setup.features), jnp.asarray(setup.floor), mode="floor")}
    jex = Example(tokens=jnp.asarray(tokens[:, None]), valid=jnp.ones((B, 1, T), bool), delta_slots=jnp.asarray(slots),
                  measure_mask=jnp.asarray(measure),
                  target=O.Continuation(ids=jnp.asarray(ids[:, None]), weights=jnp.asarray(weights[:, None])))
    t = lambda a, dt=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(device)  # noqa: E731
    tclamps = {str(site): TorchClamp(sae=TorchSAE.from_jax(setup.sae, device),
                                     features=t(setup.features.astype(np.int64)),
                                     values=t(setup.floor, torch.float32), mode="floor")}
    tex = TorchExamples(tokens=t(tokens), delta_slots=t(slots), target=dict(ids=t(ids), weights=t(weights, torch.float32)))
    jcfg = RecoveryConfig(steps=steps, lr=lr, budget=setup.budget, constraint=EncoderNull("pinv", reproject=True))
    tcfg = TorchRecoveryConfig(layer=REFUSAL_LAYER, point="resid_post", steps=steps, lr=lr, budget=setup.budget,
                               projection="pinv", reproject=True, objective="continuation_logprob")
    desc = (f"refusal-shaped: SmolLM2 chat prompt {P} tokens + {A} teacher-forced base-answer tokens, delta rows at "
            f"slots {P - 1}..{T - 1} ({A + 1}), {len(setup.features)}-feature floor clamp at {site} (shipped TopK SAE; "
            f"{setup.feature_source}), continuation_logprob, encoder-null (pinv, re-projected), Adam lr {lr}, "
            f"budget {setup.budget:.2f}")
    return Problem(jex, jclamps, RecoveryProblem(site, (site,)), jcfg, "continuation_logprob", tex, tclamps, tcfg,
                   name="refusal", describe=desc)


# ----------------------------------------------------------------------------- solvers under test

JAX_MODES = {"jax": dict(), "jax_full": dict(prefix_cache=False), "jax_bf16": dict(compute_dtype="bfloat16")}
CACHED_MODES = ("jax", "jax_bf16", "torch_cached")


def jax_solver(p: Problem, steps: int | None = None, **changes: Any) -> Any:
    """The engine's ``recovery.Solver`` for ``p`` (optionally another step count or config fields)."""
    from jaxrecover.recover import solver as R

    task = jax_task(p.objective)
    cfg = p.jax_cfg.replace(**changes) if steps is None else p.jax_cfg.replace(steps=steps, **changes)
    return R.Solver(p.jax_problem, cfg, task.objective, task.success)


def jax_window(p: Problem, mode: str = "jax") -> Any:
    """The window the engine plans for ``p`` in ``mode`` (``FULL`` for ``jax_full``)."""
    from jaxrecover.recover import solver as R

    return R.plan_window(jax_solver(p, **JAX_MODES[mode]), p.jax_examples)


def jax_solve_fn(p: Problem, steps: int | None = None, mode: str = "jax") -> Callable:
    """``(model, examples, clamps) -> RecoveryResult`` of the engine as the experiments run it
    (``runner.solve_batch``: jit(vmap) of init / advance / finish, window planned from the data;
    ``mode="jax_full"`` forces the full path, ``"jax_bf16"`` bf16 compute)."""
    from jaxrecover.recover import batch as runner

    solver = jax_solver(p, steps, **JAX_MODES[mode])

    def run(model: Any, examples: Any, clamps: dict) -> Any:
        return runner.solve_batch(solver, model, examples, clamps)

    run.solver = solver  # type: ignore[attr-defined]
    return run


def jax_task(objective: str) -> Any:
    from jaxrecover.recover import objectives as O

    return {"logit_diff": O.LOGIT_DIFF, "choice_margin": O.CHOICE_MARGIN, "continuation_logprob": O.LOGPROB}[objective]


def jax_minimal_fn(p: Problem, cache_prefix: bool, steps: int | None = None) -> Callable:
    """A minimal recovery loop (value_and_grad, encoder-null projection, Adam, clip, ``lax.scan``).

    ``cache_prefix=True``: ``run_to`` once, ``run_from`` every step (what the engine does).
    ``cache_prefix=False``: the full ``forward`` every step; an ``optimization_barrier`` tying the
    tokens to ``delta`` stops XLA from hoisting the (delta-independent) prefix out of the loop, so
    this is the paper's "full forward every step".
    """
    import optax

    from jaxrecover.recover import projections as proj
    from jaxrecover.sae.clamp import AddDelta, compose
    from jaxrecover.recover.objectives import Readout
    from jaxrecover.model.transformer import forward, run_from, run_to

    task = jax_task(p.objective)
    site = p.jax_problem.delta_site
    cfg = p.jax_cfg
    n_steps = cfg.steps if steps is None else steps
    clamp = p.jax_clamps[site]
    basis = proj.encoder_null_projector(clamp.sae, clamp.features, method=cfg.constraint.projector, ridge=cfg.constraint.ridge)
    tx = optax.adam(cfg.lr)

    def one(model: Any, ex: Any, clamps: dict) -> Any:
        tokens, valid = ex.tokens[0], ex.valid[0]
        below = {s: c for s, c in clamps.items() if s.layer < site.layer}
        prefix = run_to(model, tokens, site.layer, below, valid=valid) if cache_prefix else None

        def hooks(delta: Any) -> dict:
            return {**clamps, site: compose(clamps[site], AddDelta(delta, ex.delta_slots))}

        def loss(delta: Any) -> Any:
            if cache_prefix:
                logits = run_from(model, prefix, site.layer, hooks(delta), valid=valid)
            else:
                toks, delta = jax.lax.optimization_barrier((tokens, delta))
                logits = forward(model, toks, hooks(delta), valid=valid)
            return -task.objective(Readout(logits=logits[None]), ex.target)

        def step(carry: Any, _: Any) -> Any:
            delta, state = carry
            value, g = jax.value_and_grad(loss)(delta)
            with jax.numpy_dtype_promotion("standard"):  # optax computes `b1 ** count` (float ** int32)
                updates, state = tx.update(proj.apply(basis, g), state, delta)
            delta = proj.clip_l2(optax.apply_updates(delta, updates), cfg.budget)
            return (delta, state), value

        delta0 = jnp.zeros((ex.delta_slots.shape[0], model.cfg.d_model), jnp.float32)
        (delta, _), losses = jax.lax.scan(step, (delta0, tx.init(delta0)), None, length=n_steps)
        return delta, losses

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))


# ----------------------------------------------------------------------------- --check: same objective


CHECK_RTOL = 1e-4


def _rel(a: Any, b: Any) -> float:
    """``max |a - b| / max(|b|, 1)`` (relative, with logits/log-probs near 0 compared absolutely)."""
    a, b = _np(a).astype(np.float64), _np(b).astype(np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0))) if a.size else 0.0


def check_cached_equals_full(tmodel: Any, p: Problem) -> dict[str, Any]:
    """``torch_cached`` vs ``torch_batched`` on ``p``: per-step losses, final and clamped objectives
    (relative difference, asserted <= 1e-4) and success decisions (asserted equal)."""
    from benchmarks.torch_reference import plan_window, recover_batched

    full = recover_batched(tmodel, p.torch_clamps, p.torch_examples, p.torch_cfg)
    cached = recover_batched(tmodel, p.torch_clamps, p.torch_examples, p.torch_cfg, cache=True)
    win = plan_window(p.torch_examples, p.objective)
    out = {
        "problem": p.name, "batch": len(p.torch_examples), "window": {"cut": win.cut, "read": win.read},
        "seq": int(p.torch_examples.tokens.shape[1]),
        "losses_rel": _rel(cached.losses, full.losses),
        "final_objective_rel": _rel(cached.final_objective, full.final_objective),
        "clamped_objective_rel": _rel(cached.clamped_objective, full.clamped_objective),
        "same_recovered": bool(torch_equal(cached.recovered, full.recovered)),
        "same_clamped_success": bool(torch_equal(cached.clamped_success, full.clamped_success)),
        "final_objective_full": _np(full.final_objective).tolist(),
        "final_objective_cached": _np(cached.final_objective).tolist(),
    }
    worst = max(out["losses_rel"], out["final_objective_rel"], out["clamped_objective_rel"])
    print(f"check {p.name} batch {out['batch']} window cut={win.cut} read={win.read} of seq {out['seq']}: torch cached vs "
          f"full: losses {out['losses_rel']:.2e}, final objective {out['final_objective_rel']:.2e}, clamped objective "
          f"{out['clamped_objective_rel']:.2e} (relative, limit {CHECK_RTOL:.0e}); same decisions: "
          f"{out['same_recovered'] and out['same_clamped_success']}", file=sys.stderr, flush=True)
    assert worst <= CHECK_RTOL, f"torch cached path differs from the full path by {worst:.3e} relative on {p.name}"
    assert out["same_recovered"] and out["same_clamped_success"], f"torch cached path changes decisions on {p.name}"
    out["passed"] = True
    return out


def _np(x: Any) -> np.ndarray:
    """A host NumPy array from a JAX array or a (possibly CUDA) torch tensor."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def torch_equal(a: Any, b: Any) -> bool:
    return bool(np.array_equal(_np(a), _np(b)))


# ----------------------------------------------------------------------------- measuring one cell


def _measure(fn: Callable, args: tuple, repeats: int, compiled: bool) -> dict[str, Any]:
    """First call (compile) and steady time of ``fn(*args)`` with peak memory of the steady calls;
    ``out`` is the last call's result."""
    out: dict[str, Any] = {}
    if compiled:
        first, _ = _timing.time_compile(fn, *args)
        out["first_call_s"] = first
    _timing.reset_device_peaks()
    with _timing.PeakRSS() as mem:
        steady = _timing.time_steady(fn, *args, repeats=repeats, warmup=0)
    out["steady"] = steady.as_dict()
    out["solve_s"] = steady.median
    out["out"] = steady.last
    out["peak_rss_delta_bytes"] = mem.peak_bytes
    out.update(_timing.device_peak_bytes())
    if compiled:
        out["compile_s"] = max(out["first_call_s"] - steady.median, 0.0)
    return out


def _jax_advance_s(solve: Callable, model: Any, p: Problem) -> dict[str, Any]:
    """Seconds of ONE call of the engine's compiled ``advance`` piece (the ``steps`` optimisation steps
    in one ``lax.scan``; compiled already by ``solve``), from the state ``init`` gives."""
    from jaxrecover.recover import solver as R
    from jaxrecover.recover import batch as runner

    solver = solve.solver
    window = R.plan_window(solver, p.jax_examples)
    args = (model, p.jax_examples, p.jax_clamps)
    ctx, state = _timing.block(runner.compiled(solver, "init", window)(*args))
    advance = runner.compiled(solver, "advance", window, solver.cfg.steps)
    t0 = time.perf_counter()
    _timing.block(advance(*args, ctx, state))
    return {"advance_s": time.perf_counter() - t0, "window": {"cut": window.cut, "read": window.read}}


def mode_flops(mode: str, cfg: Any, p: Problem) -> dict[str, float]:
    """FLOPs per example-step of the algorithm ``mode`` runs on ``p``: the planned window for the
    cached modes, every slot from the delta layer on for the batched full modes, and the whole model
    for ``torch_loop`` (it recomputes the prefix every step)."""
    seq = int(p.jax_examples.tokens.shape[-1])
    layer = p.jax_problem.delta_site.layer
    if mode in CACHED_MODES:
        w = jax_window(p, "jax")
        return flops_per_example_step(cfg, seq, layer, cut=w.cut, read=w.read)
    if mode == "torch_loop":
        return flops_per_example_step(cfg, seq, 0)
    return flops_per_example_step(cfg, seq, layer)


def bench_cell(mode: str, jmodel: Any, tmodel: Any, p: Problem, repeats: int, flops: dict[str, float],
               peak_tflops: float) -> dict[str, Any]:
    """Time one mode on one problem: the full solve (compile, steady), and the step time: for JAX the
    engine's ``advance`` piece alone, for torch ``(solve(steps) - solve(0 steps)) / steps``."""
    from benchmarks.torch_reference import recover_batched, recover_per_example

    steps = p.jax_cfg.steps
    B = int(p.jax_examples.tokens.shape[0])
    args = (jmodel, p.jax_examples, p.jax_clamps)
    extra: dict[str, Any] = {}
    if mode in JAX_MODES:
        solve = jax_solve_fn(p, mode=mode)
        full = _measure(solve, args, repeats, True)
        parts = _jax_advance_s(solve, jmodel, p)
        # init (prefix, reference pass, K/V cache, projector, unclamped base pass) + finish (full-path
        # evaluation and metrics) + the runner's dispatch
        extra = {**parts, "overhead_s": max(full["solve_s"] - parts["advance_s"], 0.0)}
        step_total = parts["advance_s"]
        res = full["out"]
        objective, recovered = res.objective, res.success
    elif mode in ("jax_min_cache", "jax_min_full"):
        cache = mode == "jax_min_cache"
        full = _measure(jax_minimal_fn(p, cache), args, repeats, True)
        zero = _measure(jax_minimal_fn(p, cache, steps=0), args, repeats, True)
        extra = {"overhead_s": zero["solve_s"]}
        step_total = full["solve_s"] - zero["solve_s"]
        objective = recovered = None
    elif mode in ("torch_loop", "torch_batched", "torch_cached", "torch_compiled"):
        if mode == "torch_loop":
            run = lambda c: recover_per_example(tmodel, p.torch_clamps, p.torch_examples, c)  # noqa: E731
        else:
            kw = dict(compile=mode == "torch_compiled", cache=mode == "torch_cached")
            run = lambda c: recover_batched(tmodel, p.torch_clamps, p.torch_examples, c, **kw)  # noqa: E731
        compiled = mode == "torch_compiled"
        # the 0-step solve first: it also warms torch's allocator and kernels for the timed solve
        zero = _measure(run, (dataclasses.replace(p.torch_cfg, steps=0),), repeats, compiled)
        full = _measure(run, (p.torch_cfg,), repeats, compiled)
        extra = {"overhead_s": zero["solve_s"]}
        step_total = full["solve_s"] - zero["solve_s"]
        objective, recovered = full["out"].final_objective, full["out"].recovered
    else:
        raise ValueError(f"unknown mode {mode!r}")
    # on tiny models the difference of two noisy timings can be <= 0: flag it (the MFU is then meaningless)
    unreliable = step_total <= 0.05 * full["solve_s"]
    step_s = max(step_total, 1e-12) / max(steps, 1)
    achieved = flops["step_flops"] * B / step_s
    return {
        **{k: v for k, v in full.items() if k not in ("steady", "out")},
        **extra,
        "steady_times_s": full["steady"]["times_s"],
        "step_s": step_s,
        "step_s_unreliable": unreliable,
        "examples_per_s": B / full["solve_s"],
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak_tflops * 1e12),
        "final_objective": None if objective is None else _np(objective).astype(np.float64).tolist(),
        "recovered": None if recovered is None else _np(recovered).astype(bool).tolist(),
    }


# ----------------------------------------------------------------------------- ratios, agreement, targets

# (name, numerator mode, denominator mode): examples/s ratios, same problem and batch
RATIO_PAIRS = (
    ("framework_cached", "jax", "torch_cached"),
    ("framework_full", "jax_full", "torch_batched"),
    ("end_to_end", "jax", "torch_loop"),
    ("engine_cache_speedup", "jax", "jax_full"),
    ("torch_cache_speedup", "torch_cached", "torch_batched"),
    ("bf16_vs_fp32", "jax_bf16", "jax"),
    ("jax_vs_torch_full", "jax", "torch_batched"),
    ("jax_vs_torch_compiled", "jax", "torch_compiled"),
    ("torch_batched_vs_loop", "torch_batched", "torch_loop"),
    ("prefix_ablation", "jax_min_cache", "jax_min_full"),
)


# the same pairs on the time of ONE optimisation step of the whole batch (torch step_s / jax step_s):
# the per-step algorithm alone, without init / final evaluation (the engine's init also runs the
# unclamped base pass and its finish a full-path evaluation with metrics, which torch does not)
STEP_PAIRS = (
    ("framework_cached_step", "jax", "torch_cached"),
    ("framework_full_step", "jax_full", "torch_batched"),
    ("end_to_end_step", "jax", "torch_loop"),
    ("bf16_vs_fp32_step", "jax_bf16", "jax"),
)


def _speed(r: dict[str, Any], metric: str) -> float:
    return r["examples_per_s"] if metric == "solve" else 1.0 / r["step_s"]


def _geomean(vals: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"a/b": {"geomean": all cells, "geomean_<problem>": ..., "<problem>_b<batch>": ...}}``."""
    by = {(r["mode"], r["problem"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {}
    for _, a, b in RATIO_PAIRS:
        vals = {(pr, n): by[(a, pr, n)]["examples_per_s"] / by[(b, pr, n)]["examples_per_s"]
                for (m, pr, n) in by if m == a and (b, pr, n) in by}
        if not vals:
            continue
        entry: dict[str, Any] = {"geomean": round(_geomean(list(vals.values())), 3)}
        for pr in dict.fromkeys(pr for pr, _ in vals):
            entry[f"geomean_{pr}"] = round(_geomean([v for (q, _), v in vals.items() if q == pr]), 3)
        entry.update({f"{pr}_b{n}": round(v, 3) for (pr, n), v in vals.items()})
        out[f"{a}/{b}"] = entry
    return out


def two_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{problem: {ratio name: {"b1": .., "b2": .., ..., "geomean": ..}}}`` for every named pair."""
    by = {(r["mode"], r["problem"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {}
    pairs = [(*x, "solve") for x in RATIO_PAIRS] + [(*x, "step") for x in STEP_PAIRS]
    for pr in dict.fromkeys(r["problem"] for r in rows):
        for name, a, b, metric in pairs:
            cells = {n: _speed(by[(a, pr, n)], metric) / _speed(by[(b, pr, n)], metric)
                     for (m, q, n) in sorted(by, key=lambda k: k[2]) if m == a and q == pr and (b, pr, n) in by}
            if cells:
                out.setdefault(pr, {})[name] = {
                    "pair": f"{a} / {b}" + (" (per step)" if metric == "step" else ""), **{f"b{n}": round(v, 3) for n, v in cells.items()},
                    "geomean": round(_geomean(list(cells.values())), 3)}
    return out


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per problem and batch: each mode's largest relative deviation of the final objectives from the
    reference mode (``torch_batched``, else ``jax``), and whether the recovered decisions are equal."""
    out: dict[str, Any] = {}
    cells = {(r["problem"], r["batch"]) for r in rows}
    for pr, n in sorted(cells):
        here = {r["mode"]: r for r in rows if r["problem"] == pr and r["batch"] == n and r.get("final_objective") is not None}
        ref = "torch_batched" if "torch_batched" in here else ("jax" if "jax" in here else None)
        if ref is None:
            continue
        for m, r in here.items():
            if m == ref:
                continue
            out.setdefault(pr, {}).setdefault(m, {})[f"b{n}"] = {
                "objective_rel": _rel(r["final_objective"], here[ref]["final_objective"]),
                "same_recovered": r["recovered"] == here[ref]["recovered"], "vs": ref}
    return out


def targets(two: dict[str, Any]) -> dict[str, Any]:
    """Issue 9's targets: framework ratio >= 1.0 at every batch >= 2 on both problems (cached pair;
    the full pair reported alongside), end-to-end >= 10x at batch 8 on the refusal-shaped problem."""
    out: dict[str, Any] = {}
    for pr, rs in two.items():
        for name in ("framework_cached", "framework_full", "framework_cached_step", "framework_full_step"):
            cells = {k: v for k, v in rs.get(name, {}).items() if k.startswith("b") and int(k[1:]) >= 2}
            if cells:
                worst = min(cells.values())
                out[f"{pr}: {name} >= 1.0 at every batch >= 2"] = {"met": worst >= 1.0, "min": worst}
    e2e = two.get("refusal", {}).get("end_to_end", {})
    if "b8" in e2e:
        out["refusal: end_to_end >= 10x at batch 8"] = {"met": e2e["b8"] >= 10.0, "value": e2e["b8"]}
    return out


# ----------------------------------------------------------------------------- outputs


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# Recovery benchmark: {meta['model']} on {meta['cpu_model']} ({meta['device']})",
        "",
        f"`{meta['command']}`",
        "",
        f"CPU: **{meta['cpu_model']}**, {meta['cpu_count']} cores; jax {meta['jax_version']}, torch {meta['torch_version']}, "
        f"numpy {meta['numpy_version']}, transformers {meta['transformers_version']}; torch threads {meta['torch_threads']}; "
        f"steps={meta['steps']}, repeats={meta['repeats']}, dtype {meta['dtype']}; {meta['date']}; "
        f"whole run {meta['wall_s']:.0f} s; load average (1/5/15 min) at start {meta['loadavg_at_start']}, at end "
        f"{meta['loadavg_at_end']}; JAX compilation cache: {meta['jax_compilation_cache'] or 'none'}.",
        "",
        "Every mode ran in this one process, one cell after another. Ratios are examples/s ratios "
        "(whole solve: init + steps + final evaluation) at the same problem and batch.",
        "",
    ]
    for pr, desc in meta["problems"].items():
        lines += [f"## Problem `{pr}`", "", desc, ""]
        win = meta["windows"].get(pr)
        if win:
            lines += [f"Planned window (engine and torch_cached): cut={win['cut']}, read={win['read']} of seq {win['seq']}.", ""]
        two = report["two_ratios"].get(pr, {})
        if two:
            batches = sorted({int(k[1:]) for v in two.values() for k in v if k.startswith("b")})
            lines += ["| ratio | pair | " + " | ".join(f"batch {b}" for b in batches) + " | geomean |",
                      "|---|---|" + "---:|" * (len(batches) + 1)]
            for name, v in two.items():
                lines.append(f"| {name} | {v['pair']} | " + " | ".join(_fmt(v.get(f"b{b}"), ".2f") for b in batches)
                             + f" | {_fmt(v['geomean'], '.2f')} |")
            lines.append("")
        lines += ["| mode | batch | compile s | solve s | examples/s | step ms | init+finish s | GFLOP/step/ex | GFLOP/s | MFU % | peak RSS Δ MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in report["rows"] if r["problem"] == pr):
            lines.append(
                f"| {r['mode']} | {r['batch']} | {_fmt(r.get('compile_s'), '.1f')} | {_fmt(r['solve_s'], '.3f')} "
                f"| {_fmt(r['examples_per_s'], '.3f')} | {_fmt(1e3 * r['step_s'], '.1f')} | {_fmt(r.get('overhead_s'), '.3f')} "
                f"| {_fmt(r['step_flops'] / 1e9, '.2f')} | {_fmt(1e3 * r['achieved_tflops'], '.1f')} "
                f"| {_fmt(100 * r['mfu'], '.1f')} | {_fmt(r['peak_rss_delta_bytes'] / 2**20, '.0f')} |")
        lines.append("")
        agr = report["agreement"].get(pr, {})
        if agr:
            lines += ["Same problem solved: largest relative deviation of the final objectives from "
                      f"`{next(iter(next(iter(agr.values())).values()))['vs']}` (`|a-b|/max(|b|,1)`), and equal recovered decisions:", ""]
            for m, cells in agr.items():
                lines.append(f"- {m}: " + ", ".join(f"{k} {v['objective_rel']:.1e}{'' if v['same_recovered'] else ' (decisions differ)'}"
                                                  for k, v in cells.items()))
            lines.append("")
    if report.get("check"):
        lines += ["## --check: torch cached path vs torch full path", ""]
        for c in report["check"]:
            lines.append(f"- {c['problem']} (batch {c['batch']}, window cut={c['window']['cut']} read={c['window']['read']} of "
                         f"seq {c['seq']}): per-step losses {c['losses_rel']:.1e}, final objective {c['final_objective_rel']:.1e}, "
                         f"clamped objective {c['clamped_objective_rel']:.1e} relative (limit {CHECK_RTOL:.0e}); same decisions: "
                         f"{c['same_recovered'] and c['same_clamped_success']}; passed: {c['passed']}")
        lines.append("")
    if report["targets"]:
        lines += ["## Targets (issue 9)", ""]
        for k, v in report["targets"].items():
            val = v.get("min", v.get("value"))
            lines.append(f"- {k}: **{'met' if v['met'] else 'NOT met'}** ({val:.2f})")
        lines.append("")
    lines += ["Columns: step ms = one optimisation step of the whole batch (JAX: the engine's `advance` alone / steps; "
              "torch: (solve(steps) - solve(0)) / steps); init+finish s = JAX solve - advance, torch solve(0 steps); "
              "GFLOP/step/ex = what the mode's algorithm needs (window for the cached modes, every slot from the delta "
              "layer for the full modes, the whole model for torch_loop); MFU = those FLOPs / step time / the matmul rate "
              "measured just before the cell.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(2, len(problems), figsize=(5.8 * len(problems), 8), squeeze=False)
    for j, pr in enumerate(problems):
        ax = axes[0][j]
        for mode in dict.fromkeys(r["mode"] for r in rows if r["problem"] == pr):
            rs = sorted((r for r in rows if r["mode"] == mode and r["problem"] == pr), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rs], [r["examples_per_s"] for r in rs], marker="o", label=mode)
        ax.set_title(f"{pr}: examples / s (whole solve)", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        for name, v in report["two_ratios"].get(pr, {}).items():
            if name not in ("framework_cached", "framework_full", "end_to_end", "framework_cached_step"):
                continue
            bs = sorted(int(k[1:]) for k in v if k.startswith("b"))
            ax.plot(bs, [v[f"b{b}"] for b in bs], marker="o", label=f"{name} ({v['pair']})")
        ax.axhline(1.0, color="grey", lw=0.8)
        if pr == "refusal":
            ax.axhline(10.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{pr}: ratios (examples/s)", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        for a in (axes[0][j], axes[1][j]):
            a.set_xscale("log", base=2)
            a.set_xlabel("batch (examples)")
            a.grid(alpha=0.3, which="both")
    meta = report["meta"]
    fig.suptitle(f"recovery: {meta['model']}, {meta['steps']} steps, {meta['cpu_model']} ({meta['cpu_count']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

_EPILOG = """\
what is compared (all in one process, one cell after another)
  jax            the engine as experiments run it: runner.solve_batch (jit(vmap) of recovery init /
                 advance / finish), window planned from the data: K/V of the slots before the first
                 delta slot cached once, each step runs slots cut..seq and unembeds slots read..seq
  jax_full       the same with window=recovery.FULL (every slot from the delta layer on)
  jax_bf16       jax with RecoveryConfig(compute_dtype="bfloat16") (--bf16-problems/--bf16-batches)
  torch_cached   PyTorch batched, same caching + read-slot unembedding (recover_batched(cache=True))
  torch_batched  PyTorch batched, full path (prefix below the delta layer cached, as jax_full)
  torch_loop     the paper's way: Python loop over examples, HF forward hooks, full forward every step
  torch_compiled torch_batched under torch.compile (only with --torch-compile; slow to compile on CPU)
  jax_min_cache / jax_min_full: minimal JAX loop with the prefix below the delta layer cached or
                 recomputed (the prefix ablation; on by default, --no-prefix-ablation skips it)

ratios (examples/s, same problem and batch; per batch and geomean)
  framework_cached  jax / torch_cached      framework_full  jax_full / torch_batched
  end_to_end        jax / torch_loop        bf16_vs_fp32    jax_bf16 / jax

what is reported (per problem, mode, batch)
  compile_s      first call minus steady call (JAX: trace + XLA compile; torch eager: none)
  solve_s        steady wall time of a whole solve of the batch (init + steps + final evaluation)
  examples_per_s batch / solve_s
  step_s         one optimisation step of the whole batch: JAX = the engine's advance piece / steps;
                 torch = (solve(steps) - solve(0 steps)) / steps
  step_flops     FLOPs per example-step of the mode's algorithm (window / full suffix / whole model)
  mfu            step_flops * batch / step_s / peak (a measured large matmul; an achievable peak)

examples
  the committed CPU run (both problems, both ratios, --check, bf16 once):
    python benchmarks/bench_recovery.py --model smollm2 --problems synthetic,refusal --seqs 32 \\
        --batches 1,2,4,8 --steps 10 --torch-threads 1 --no-prefix-ablation --check \\
        --bf16-problems refusal --bf16-batches 8
  smoke test (seconds):
    python benchmarks/bench_recovery.py --model random:tiny --seqs 16 --batches 1,2 --steps 2 --check --out /tmp/b
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_recovery.py",
        description="Speed of post-intervention recovery: the jaxrecover engine vs a faithful PyTorch reference "
                    "(same algorithm batched, cached and full, and the paper's per-example loop), in one run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="random:smollm2-135m",
                    help="'smollm2' (the embedded SmolLM2-135M-Instruct), 'random:<preset>' with preset in "
                         f"{sorted(PRESETS)} (random weights built by transformers, cached), or an HF folder.")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="model weights/compute dtype in both frameworks (delta and SAE stay float32).")
    ap.add_argument("--problems", default="synthetic",
                    help="comma-separated: 'synthetic' (random tokens, one problem per --seqs) and/or 'refusal' "
                         "(refusal-shaped; needs --model smollm2).")
    ap.add_argument("--seqs", default="32,64", help="comma-separated sequence lengths of the synthetic problem.")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes (default 1,2,4,8 on CPU; 1,...,256 on GPU).")
    ap.add_argument("--steps", type=int, default=10, help="optimisation steps per solve.")
    ap.add_argument("--layer", type=int, default=None, help="synthetic: delta/clamp layer (default n_layers // 2).")
    ap.add_argument("--point", default="resid_post", choices=("resid_pre", "resid_post"))
    ap.add_argument("--objective", default="logit_diff", choices=("logit_diff", "choice_margin", "continuation_logprob"),
                    help="synthetic problem's objective.")
    ap.add_argument("--modes", default="jax,jax_full,torch_cached,torch_batched,torch_loop",
                    help="comma-separated modes to time (see below); --torch-compile adds torch_compiled.")
    ap.add_argument("--bf16-problems", default="", help="comma-separated problems on which jax_bf16 is also timed.")
    ap.add_argument("--bf16-batches", default=None, help="batches for jax_bf16 (default: all).")
    ap.add_argument("--check", action="store_true",
                    help="first assert that torch_cached equals torch_batched (losses, final and clamped objectives "
                         f"within {CHECK_RTOL:g} relative, same decisions) on every problem at the largest batch.")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch_batched under torch.compile.")
    ap.add_argument("--no-prefix-ablation", action="store_true", help="skip the jax_min_cache / jax_min_full pair.")
    ap.add_argument("--ablation-batch", type=int, default=None,
                    help="batch size of the prefix ablation (default: the largest batch).")
    ap.add_argument("--loop-max-batch", type=int, default=None,
                    help="skip torch_loop above this batch size (it is linear in the batch).")
    ap.add_argument("--repeats", type=int, default=None, help="steady-state repeats (default 1 on CPU, 3 on GPU).")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU, TFLOP/s (default: measured large matmul in --dtype).")
    ap.add_argument("--torch-threads", default=None,
                    help="torch.set_num_threads for the torch modes (default: torch's choice, one per core). On a "
                         "shared, oversubscribed CPU, OpenMP threads that spin at barriers can make torch several "
                         "times slower; 1 avoids that. 'auto': time a forward+backward of the model with 1 thread "
                         "and with one per core just before the cells and keep the faster (recorded in the JSON).")
    ap.add_argument("--jax-cache-dir", default=None,
                    help="JAX persistent compilation cache folder. A first run fills it; a rerun loads the compiled "
                         "programs, so its compile_s is a cache load (the steady timings are unaffected).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/).")
    ap.add_argument("--name", default=None, help="file stem (default recovery_<model>_<problems>_<dtype>).")
    return ap.parse_args(argv)


def cpu_model() -> str:
    """``lscpu``'s Model name (else /proc/cpuinfo's model name, else platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pick_torch_threads(tmodel: Any, seq: int = 64, batch: int = 4) -> dict[str, float]:
    """Time a forward+backward of the torch model (random tokens, gradient w.r.t. the embeddings) with
    1 thread and with one per core; keep the faster (a shared CPU can make spinning OpenMP threads
    slower than one). Returns the best time per thread count."""
    import torch

    tokens = torch.randint(0, tmodel.config.vocab_size, (batch, seq))
    out: dict[str, float] = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        best = math.inf
        for _ in range(3):
            emb = tmodel.get_input_embeddings()(tokens).detach().requires_grad_(True)
            t0 = time.perf_counter()
            tmodel(inputs_embeds=emb).logits[:, -1].float().logsumexp(-1).sum().backward()
            best = min(best, time.perf_counter() - t0)
        out[str(n)] = best
    torch.set_num_threads(int(min(out, key=out.get)))
    print(f"torch threads: {torch.get_num_threads()} (forward+backward {', '.join(f'{k} thread(s) {v:.3f}s' for k, v in out.items())})",
          file=sys.stderr, flush=True)
    return out


def _csv(text: str | None) -> list[str]:
    return [t for t in (text or "").split(",") if t]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    import transformers

    from benchmarks.torch_reference import load_hf_model
    from jaxrecover.io.hf import load_transformer

    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    on_gpu = jax.devices()[0].platform != "cpu"
    default_batches = "1,2,4,8,16,32,64,128,256" if on_gpu else "1,2,4,8"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    repeats = args.repeats or (3 if on_gpu else 1)
    tdev = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    if args.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.jax_cache_dir).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.torch_threads and args.torch_threads != "auto":
        torch.set_num_threads(int(args.torch_threads))
    modes = _csv(args.modes)
    if args.torch_compile and "torch_compiled" not in modes:
        modes.append("torch_compiled")
    problems = _csv(args.problems)
    unknown = [p for p in problems if p not in ("synthetic", "refusal")]
    if unknown:
        raise SystemExit(f"--problems: unknown {unknown}; expected synthetic and/or refusal.")
    if "refusal" in problems and args.model != "smollm2":
        raise SystemExit("--problems refusal needs --model smollm2 (real SmolLM2-135M-Instruct weights and the shipped SAE).")
    bf16_problems = set(_csv(args.bf16_problems))
    bf16_batches = {int(b) for b in _csv(args.bf16_batches)} or set(batches)

    folder = resolve_model(args.model, args.dtype, args.seed)
    jmodel = load_transformer(folder, dtype=args.dtype)
    tmodel = load_hf_model(folder, dtype=getattr(torch, args.dtype), device=tdev)
    cfg = jmodel.cfg
    layer = cfg.n_layers // 2 if args.layer is None else args.layer
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    else:
        peak, peak_source = measure_peak_tflops(args.dtype), "measured matmul, max over the run"
    peaks = [peak]
    cpu = cpu_model()
    thread_probe = pick_torch_threads(tmodel) if args.torch_threads == "auto" else None
    print(f"model {args.model} ({folder}), device {device_name()} ({cpu}), peak {peak:.3f} TFLOP/s",
          file=sys.stderr, flush=True)

    # problem builders: name -> (batch -> Problem)
    builders: dict[str, Callable[[int], Problem]] = {}
    if "synthetic" in problems:
        for seq in (int(s) for s in args.seqs.split(",")):
            builders[f"seq{seq}"] = (lambda b, seq=seq: build_problem(
                jmodel, batch=b, seq=seq, objective=args.objective, layer=layer, point=args.point, steps=args.steps,
                seed=args.seed, device=tdev))
    if "refusal" in problems:
        t0 = time.perf_counter()
        setup = refusal_setup(jmodel, folder, max(batches))
        print(f"refusal problem prepared in {time.perf_counter() - t0:.0f}s ({setup.feature_source}; budget "
              f"{setup.budget:.2f})", file=sys.stderr, flush=True)
        builders["refusal"] = lambda b: build_refusal_problem(setup, batch=b, steps=args.steps, device=tdev)

    checks = []
    if args.check:
        for name, build in builders.items():
            checks.append(check_cached_equals_full(tmodel, build(max(batches))))

    rows: list[dict[str, Any]] = []
    descs: dict[str, str] = {}
    windows: dict[str, dict[str, int]] = {}
    ablation_batch = args.ablation_batch or max(batches)
    for name, build in builders.items():
        for batch in batches:
            p = build(batch)
            seq = int(p.jax_examples.tokens.shape[-1])
            w = jax_window(p)
            descs[name] = p.describe or (
                f"synthetic: random tokens, seq {seq}, delta site {p.jax_problem.delta_site}, random 4-feature SAE clamp "
                f"(set 0), delta on the last 2 slots, {p.objective}, encoder-null ({p.jax_cfg.constraint.projector}), Adam lr "
                f"{p.jax_cfg.lr}, budget {p.jax_cfg.budget}")
            windows[name] = {"cut": w.cut, "read": w.read, "seq": seq}
            cell_modes = list(modes)
            if name in bf16_problems and batch in bf16_batches:
                cell_modes.append("jax_bf16")
            if not args.no_prefix_ablation and batch == ablation_batch:
                cell_modes += ["jax_min_cache", "jax_min_full"]
            for mode in cell_modes:
                if mode == "torch_loop" and args.loop_max_batch is not None and batch > args.loop_max_batch:
                    continue
                t0 = time.perf_counter()
                # On a shared machine the achievable matmul rate moves with the load: re-measure it next
                # to each cell, so that the cell's MFU compares like with like.
                cell_peak = peak if args.peak_tflops is not None else measure_peak_tflops(args.dtype)
                peaks.append(cell_peak)
                flops = mode_flops(mode, cfg, p)
                try:
                    r = bench_cell(mode, jmodel, tmodel, p, repeats, flops, cell_peak)
                    r["cell_peak_tflops"] = cell_peak
                except Exception as err:  # noqa: BLE001 - e.g. torch.compile unavailable: record and go on
                    print(f"  {name} {mode} batch={batch}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
                    rows.append({"problem": name, "mode": mode, "seq": seq, "batch": batch,
                                 "error": f"{type(err).__name__}: {err}"})
                    continue
                rows.append({"problem": name, "mode": mode, "seq": seq, "batch": batch, **flops, **r})
                print(f"  {name:9s} {mode:14s} batch={batch:4d}: {r['examples_per_s']:9.3f} ex/s, "
                      f"step {1e3 * r['step_s']:9.2f} ms, MFU {100 * r['mfu']:6.2f}%, "
                      f"compile {r.get('compile_s', 0.0):6.1f}s  ({time.perf_counter() - t0:.0f}s wall)",
                      file=sys.stderr, flush=True)

    ok_rows = [r for r in rows if "error" not in r]
    peak = max(peaks)
    for r in ok_rows:
        r["mfu_vs_max_peak"] = r["achieved_tflops"] / peak
    two = two_ratios(ok_rows)
    meta = {
        "command": "python benchmarks/bench_recovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "model_dir": str(folder),
        "config": dataclasses.asdict(cfg),
        "dtype": args.dtype,
        "problems": descs,
        "windows": windows,
        "steps": args.steps,
        "repeats": repeats,
        "device": device_name(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_device": tdev,
        "torch_threads": torch.get_num_threads(),
        "torch_threads_probe_s": thread_probe,
        "jax_compilation_cache": args.jax_cache_dir,
        "peak_tflops_measurements": peaks,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(__import__("jaxlib"), "__version__", "?"),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": load_start,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": time.perf_counter() - t_start,
        "max_rss_bytes": _timing.max_rss_bytes(),
    }
    report = {"meta": meta, "rows": rows, "two_ratios": two, "targets": targets(two), "ratios": ratios(ok_rows),
              "agreement": agreement(ok_rows), "check": checks, "errors": [r for r in rows if "error" in r]}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device_name()
    out.mkdir(parents=True, exist_ok=True)
    slug = lambda t: re.sub(r"[^a-z0-9.]+", "-", t.lower()).strip("-")  # noqa: E731
    stem = args.name or f"recovery_{slug(args.model)}_{slug('-'.join(problems))}_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown({**report, "rows": ok_rows}))
    if ok_rows:
        plot({**report, "rows": ok_rows}, out / f"{stem}.png")
    print(f"wrote {out / stem}.json/.md/.png", file=sys.stderr)
    print(json.dumps({"two_ratios": two, "targets": report["targets"]}, indent=2))
    return report


if __name__ == "__main__":
    main()
