"""Shared plumbing for the experiment files: model/SAE loading, prompt encoding, batched
generation, and writing results. Experiment logic lives in each experiment file."""

import contextlib
import contextvars
import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.model.generate import generate as _generate
from jaxrecover.runtime import report as report
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.core.sites import Site



# The stage clock of the run in progress: opened by ``stage_clock`` (the driver, a sweep, an audit), so
# timings of one run never leak into the next one in the same process (tests run many).
_CLOCK: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("jaxrecover_stage_clock", default=None)


@contextlib.contextmanager
def stage_clock():
    """A fresh clock for one run's ``stage`` timings (nested runs get their own)."""
    token = _CLOCK.set({})
    try:
        yield
    finally:
        _CLOCK.reset(token)


@contextlib.contextmanager
def stage(name: str):
    """Time a pipeline stage (wall seconds, summed over repeats) on the open ``stage_clock``."""
    say(f"{name} ...")
    t0 = time.time()
    try:
        yield
    finally:
        clock = _CLOCK.get()
        if clock is not None:
            clock[name] = clock.get(name, 0.0) + time.time() - t0


def stage_times() -> dict[str, float]:
    """The open clock's stage timings so far, rounded ({} outside a ``stage_clock``)."""
    return {k: round(v, 2) for k, v in (_CLOCK.get() or {}).items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Options every setting shares, with ONE name each (a setting's Config subclasses this and may
    re-declare a field to change its default). Values are checked in ``__post_init__``, before
    anything is loaded, so a bad flag costs nothing."""

    out: str = dataclasses.field(default="", metadata={"help": "results folder ('' = results/<setting> in the current folder)"})
    model_dir: str = dataclasses.field(default="", metadata={"help": "Hugging Face model folder ('' = embedded SmolLM2-135M-Instruct)"})
    sae: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "SAE path(s), comma-separated ('' = shipped SAEs at --layers)"})
    layers: tuple[int, ...] = dataclasses.field(default=(9,), metadata={"help": "layers of the shipped SAEs used when --sae is empty"})
    sae_release: str = dataclasses.field(default="jumprelu", metadata={"help": "shipped SAEs used when --sae is empty: jumprelu (layer 9; the default, as the paper's Gemma Scope SAEs are JumpReLU: encoder-null perturbations leave the clamped latents exactly unchanged) | topk (layers 9, 15)"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "float32 | bfloat16 (model compute; losses, projections and norms stay float32)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed"})
    n_features: int = dataclasses.field(default=20, metadata={"help": "number of clamped SAE features K"})
    max_flips: int = dataclasses.field(default=8, metadata={"help": "recover at most this many valid flips (0 = all)"})
    require_flip: bool = dataclasses.field(default=True, metadata={"help": "recover valid flips only (false: every example; smoke tests)"})
    steps: int = dataclasses.field(default=100, metadata={"help": "optimisation steps"})
    lr: float = dataclasses.field(default=0.1, metadata={"help": "Adam learning rate"})
    budget: float = dataclasses.field(default=20.0, metadata={"help": "L2 budget on ||delta||_F; 0 with --budget-rel > 0: relative"})
    budget_rel: float = dataclasses.field(default=0.0, metadata={"help": "with --budget 0: the budget is budget_rel x the median defended residual norm at each method's delta rows x sqrt(rows) (comparable across models)"})
    suffix_len: int = dataclasses.field(default=8, metadata={"help": "soft-suffix length (tokens)"})
    attribution: bool = dataclasses.field(default=True, metadata={"help": "decompose the delta and replay each part under the clamp (paper App. J)"})
    random_control: int = dataclasses.field(default=3, metadata={"help": "random-direction control: per recovered delta, this many random deltas of the same norm in the same constraint subspace, replayed under the clamp (0 = off)"})

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        for name, lo in (("n_features", 1), ("max_flips", 0), ("steps", 0), ("suffix_len", 1), ("random_control", 0)):
            check_range(name, getattr(self, name), lo)
        check_range("lr", self.lr, 0.0, strict_lo=True)
        check_range("budget", self.budget, 0.0)
        check_range("budget_rel", self.budget_rel, 0.0)
        if self.sae and self.layers != RunConfig.layers and len(self.layers) != len(self.sae):
            raise ValueError("--layers applies to the shipped SAEs only; with --sae give the SAE paths alone.")
        from jaxrecover.io.shipped import RELEASES, shipped_sae

        check_choice("sae_release", self.sae_release, tuple(RELEASES))
        if self.sae_release != "topk" and not self.sae:  # resolved here: every stage then sees explicit paths
            try:
                paths = tuple(str(shipped_sae(layer, release=self.sae_release)) for layer in self.layers)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"--sae-release {self.sae_release} --layers {','.join(map(str, self.layers))}: {e} "
                                 "(--sae-release topk ships layers 9 and 15).") from None
            object.__setattr__(self, "sae", paths)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_model(model_dir: str = "", dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``model_dir`` (a Hugging Face folder) or the embedded default."""
    from jaxrecover.io import embedded as embedded
    from jaxrecover.io import hf as io_hf
    from jaxrecover.model import tokenizer as tokenizer

    folder = Path(model_dir) if model_dir else embedded.default_model_dir()
    if not folder.is_dir():
        raise SystemExit(f"--model-dir {folder}: not a folder (expected config.json + *.safetensors + tokenizer.json).")
    say(f"loading model from {folder}")
    return io_hf.load_transformer(folder, dtype=dtype), tokenizer.load_tokenizer(folder)


def shipped_sae_path(layer: int, point: str = "resid_post") -> Path:
    from jaxrecover.io.shipped import shipped_sae

    return shipped_sae(layer, point)


def sae_paths(paths: Sequence[str], default_layers: Sequence[int]) -> list[Path]:
    """Explicit SAE paths, or the shipped SAEs at ``default_layers``."""
    return [Path(p) for p in paths if p] or [shipped_sae_path(layer) for layer in default_layers]


def tree_fingerprint(tree: Any) -> str:
    """sha256 over every array of a pytree (a loaded model or SAE): the content a resume key must
    follow, wherever it was loaded from (~1 s for SmolLM2-135M in float32)."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def load_sae_at(path: str | Path) -> tuple[Site, SAE]:
    """The one SAE loader of the experiments: ``(site, SAE)`` from a folder or file, in float32
    (``encode`` computes in the SAE's dtype, and a bf16 encoder rounds the input to 8 bits, which reads
    as ~1e-2 relative drift of latents that did not move); the site comes from its hook name."""
    from jaxrecover.io.compat import sae_site
    from jaxrecover.sae.files import load_sae

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"SAE path {p} does not exist (SAELens folder, Gemma Scope params.npz, or sparsify folder).")
    sae = load_sae(p, dtype="float32")
    return sae_site(sae.hook_name, str(p)), sae


def load_saes(paths: Sequence[str], default_layers: Sequence[int]) -> dict[Site, SAE]:
    """``{site: SAE}`` from explicit paths (comma list) or the shipped SAEs at ``default_layers``."""
    return dict(load_sae_at(p) for p in sae_paths(paths, default_layers))


_MSG_OUT_LINK = (
    "--out {p}: is a symbolic link (to {target}); jaxrecover never writes through a link (another "
    "run or user may own what it points to): pass the real folder."
)


def _refuse_link(p: Path) -> None:
    if p.is_symlink():
        raise SystemExit(_MSG_OUT_LINK.format(p=p, target=os.readlink(p)))


def out_dir(path: str, name: str) -> Path:
    p = Path(path) if path else Path("results") / name  # relative to where the user runs it
    _refuse_link(p)  # before mkdir: a dangling link would otherwise read as "cannot create"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {p}: cannot create the results folder ({e.strerror}).") from None
    return p


def check_writable(out: Path) -> None:
    """Fail before any expensive stage when results could not be written to ``out``, or should not
    be: ``out`` is a symlink, or another live run holds it (``report.lock_folder``). Then takes the
    folder for this run and removes temp files that killed runs left there (``report.remove_stale_temps``)."""
    from jaxrecover.runtime import distributed as distributed  # several processes: one shared folder, process 0 writes

    out = Path(out)
    for p in (out, out / "checkpoints", out / "records"):  # the folders runs write into, resumes read
        _refuse_link(p)
    distributed.check_shared_dir(out)
    if not distributed.is_writer():
        return
    probe = out / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write results there ({e.strerror}).") from None
    report.lock_folder(out)
    for p in report.remove_stale_temps(out):
        say(f"removed {p} (left by a killed run)")


def check_choice(flag: str, value: Any, allowed: Sequence[Any]) -> None:
    values = value if isinstance(value, tuple) else (value,)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"--{flag.replace('_', '-')} {','.join(map(str, values))!r}: expected {' | '.join(map(str, allowed))}.")


def check_range(flag: str, value: Any, lo: Any = None, hi: Any = None, *, strict_lo: bool = False) -> None:
    """``value`` in range and finite (ints are fine: numbers, not types, are checked)."""
    import math

    name = f"--{flag.replace('_', '-')}"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} {value}: must be a finite number.")
    if lo is not None and (value <= lo if strict_lo else value < lo):
        raise ValueError(f"{name} {value}: must be {'>' if strict_lo else '>='} {lo}.")
    if hi is not None and value > hi:
        raise ValueError(f"{name} {value}: must be <= {hi}.")


def chat(tok: Any, prompts: Sequence[str]) -> list[str]:
    from jaxrecover.model.tokenizer import apply_chat_template

    return [apply_chat_template(tok, p) for p in prompts]


def generate_texts(
    model: Any,
    tok: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    hooks: Mapping[Site, Any] | None = None,
    hooks_in_axes: Any = None,
    batch_size: int = 16,
    pad_to: int = 16,
    desc: str = "generate",
) -> tuple[list[str], list[list[int]]]:
    """Greedy generation for many chat-formatted prompts (see ``generate_tokens``)."""
    from jaxrecover.model.tokenizer import encode_batch

    tokens, valid = encode_batch(tok, list(texts), pad_to=pad_to)
    return generate_tokens(model, tok, tokens, valid, max_new_tokens=max_new_tokens, hooks=hooks,
                           hooks_in_axes=hooks_in_axes, batch_size=batch_size, desc=desc)


def generate_tokens(
    model: Any,
    tok: Any,
    tokens: np.ndarray,
    valid: np.ndarray,
    *,
    max_new_tokens: int,
    hooks: Mapping[Site, Any] | None = None,
    hooks_in_axes: Any = None,
    batch_size: int = 16,
    desc: str = "generate",
) -> tuple[list[str], list[list[int]]]:
    """Greedy generation for left-padded ``[n, seq]`` prompts in fixed-size batches (one compile per
    shape). Per-example hook arrays (``hooks_in_axes``) are sliced with the batch; the slot layout is
    exactly the one of ``tokens``, so slot-indexed perturbations line up with teacher forcing."""
    from tqdm.auto import tqdm

    from jaxrecover.model.tokenizer import decode

    n = len(tokens)
    batch_size = min(batch_size, n)
    outs_text, outs_ids = [], []
    eos = tok.eos_id
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        stop = min(n, start + batch_size)
        idx = np.arange(start, start + batch_size) % n  # pad the last batch by wrapping (dropped below)
        h = hooks
        if hooks is not None and hooks_in_axes is not None:
            h = slice_hooks(hooks, hooks_in_axes, idx)
        res = _generate(
            model, jnp.asarray(tokens[idx]), jnp.asarray(valid[idx]), max_new_tokens=max_new_tokens,
            hooks=h, hooks_in_axes=hooks_in_axes, eos_id=eos,
        )
        new = np.asarray(res.tokens)[: stop - start]
        for row in new:
            ids = [int(t) for t in row]
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            outs_ids.append(ids)
            outs_text.append(decode(tok, ids, skip_special_tokens=True))
    return outs_text, outs_ids


def slice_hooks(hooks: Mapping[Site, Any], in_axes: Mapping[Site, Any], idx: np.ndarray) -> dict[Site, Any]:
    """Take rows ``idx`` of every hook whose in_axes entry is 0 (a pytree prefix of zeros/None)."""
    out = {}
    for site, h in hooks.items():
        ax = in_axes.get(site) if isinstance(in_axes, Mapping) else in_axes
        if ax is None:
            out[site] = h
        else:
            # walk the in_axes prefix: a None leaf keeps its whole subtree, a 0 leaf slices it
            out[site] = jax.tree.map(
                lambda x, sub: sub if x is None else jax.tree.map(lambda a: a[idx], sub), ax, h,
                is_leaf=lambda x: x is None,
            )
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def rates(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Binary rate with the paper's Wilson 95% interval."""
    from jaxrecover.recover.metrics import wilson_interval

    k = sum(bool(r[key]) for r in records)
    n = len(records)
    lo, hi = wilson_interval(k, n) if n else (0.0, 0.0)
    return {"k": k, "n": n, "rate": k / n if n else None, "lo": lo, "hi": hi, "cell": report.rate_cell(k, n, lo, hi)}


def mean_ci(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Mean with the paper's bootstrap 95% interval (None values skipped)."""
    from jaxrecover.recover.metrics import bootstrap_mean_ci

    vals = [float(r[key]) for r in records if r.get(key) is not None]
    if not vals:
        return {"mean": None, "lo": None, "hi": None, "cell": "--"}
    m, lo, hi = bootstrap_mean_ci(vals)
    return {"mean": m, "lo": lo, "hi": hi, "cell": f"{m:.3f} [{lo:.3f}, {hi:.3f}]"}
