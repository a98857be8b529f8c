"""IOI circuit-level recovery (paper §5.3, Fig. 4): clamp IOI-attribution SAE features, then recover the
IO-S logit difference with a residual delta at the END slot, encoder-projected vs unconstrained.

Pipeline (paper-notes 2.3; everything batched with ``jax.vmap``):
1. ``ioi_prompts`` from ONE template (``--template-index``), so every prompt has the same token length
   and END slot (the last slot; no padding).
2. Attribution ``a_f = mean_batch z_f * dM/dz_f`` at END, ``M`` = mean IO-S logit diff, gradient taken
   at the SAE site through the decoder (``features.attribution``); top ``--n-features`` (64), a_f > 0
   first (``features.top_attribution``).
3. Clamp those features at every position. Paper Table 11: clamp to 0 (``--clamp-value 0``, mode
   "zero", the default); the authors' code sets active features to -5 (``--clamp-value -5``, mode
   "negative_on_positive").
4. Valid flips: clean diff > 0 and clamped diff <= 0 (paper: < 0; equal never happens in float).
5. Recovery on the valid flips only: Adam lr 0.1, 100 steps, ||delta|| <= 20, one delta row per prompt at
   END (the paper's formulation). ``--shared-delta true`` reproduces the authors' code instead: ONE delta
   shared by all valid flips (objective = their mean diff), then measured per prompt.
   Constraints "none" and "encoder" (exact pinv projector, delta re-projected after each step).
6. Baselines: soft suffix (8 "!" embeddings appended after the prompt, learned offsets at
   ``blocks.0.hook_resid_pre`` with the clamp on, readout at the last suffix slot, same budget on the
   offset; drift read pre-clamp at the SAE site over the suffix slots), and replay of the
   unconstrained delta's components (clamped-feature part ``dz_S W_dec[S]``, SAE-residual part).

7. Circuit-ablation contrast (``--knockout-heads``, functional surgery): attention heads above the SAE layer
   knocked out (``surgery.knockout_heads``, a new model pytree; chosen greedily by their effect on the
   logit diff) instead of clamping features, and recovered with an unconstrained delta at the same site.

Budget scale: 20 is a GPT-2 residual norm; the summary reports the mean ||h_def|| at END on this model
so the budget can be read relative to it (``delta_rel``).

Run: ``jaxrecover run ioi`` (or ``.venv/bin/python experiments/ioi.py``); ``--help`` lists the options.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any


import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.experiment import common as C
from jaxrecover.experiment import driver as D_
from jaxrecover.experiment import suite as S
from jaxrecover.data import datasets as D
from jaxrecover.sae import features as F
from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.runtime import report as report
from jaxrecover.sae.clamp import Clamp
from jaxrecover.core.sites import Site
from jaxrecover.model.tokenizer import encode_batch

NAME = "ioi"
F_ = dataclasses.field

# paper Fig. 4 + ioi_aggregate.json (valid = 37 flips of 64 prompts), paper-notes 2.3
PAPER = {
    "valid_flips": "37/64",
    "none": {"recovered": "37/37", "final_objective": 71.95, "drift_abs": 2.47, "decode_drift": 3.26,
             "react_frac": 0.041, "zero_reactivation": "24/37"},
    "encoder": {"recovered": "37/37", "final_objective": 71.44, "drift_abs": 0.78, "decode_drift": 0.97,
                "react_frac": 0.016, "zero_reactivation": "30/37"},
    "clean_diff": 3.02, "clamped_diff": -1.66,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(C.RunConfig):
    seed: int = F_(default=0, metadata={"help": "prompt sampling seed"})
    n_prompts: int = F_(default=96, metadata={"help": "IOI prompts (paper: 64, giving 37 valid flips; 64 give 29 on SmolLM2 with the JumpReLU SAE, 96 give 44)"})
    template_kind: str = F_(default="BABA", metadata={"help": "BABA | ABBA (paper: BABA)"})
    template_index: int = F_(default=0, metadata={"help": "template index (one template: shared END slot)"})
    n_features: int = F_(default=64, metadata={"help": "top-k attribution features clamped (paper: 64; with --sae-release topk 64 flips no prompt of SmolLM2, use 128)"})
    clamp_value: float = F_(default=-5.0, metadata={"help": "-5 = authors' code (active -> -5), the default because the paper's 0 (zero-ablate) flips too few prompts of SmolLM2; 0 = paper"})
    max_flips: int = F_(default=0, metadata={"help": "recover at most this many valid flips (0 = all)"})
    shared_delta: bool = F_(default=False, metadata={"help": "one delta shared by all valid flips (authors' code)"})
    suffix: bool = F_(default=True, metadata={"help": "run the soft-suffix baseline"})
    knockout_heads: int = F_(default=16, metadata={"help": "circuit-ablation contrast: knock out (jaxrecover.sae.surgery) up to this many attention heads above the SAE layer, chosen greedily by their effect on the logit diff, and recover with an unconstrained delta at the SAE site (0 = off)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        C.check_choice("template_kind", self.template_kind, ("BABA", "ABBA"))
        for name, lo in (("n_prompts", 1), ("template_index", 0), ("knockout_heads", 0)):
            C.check_range(name, getattr(self, name), lo)
        C.check_range("clamp_value", self.clamp_value)


@dataclasses.dataclass
class Prepared(S.Prepared):
    prompts: tuple
    tokens: np.ndarray
    valid: np.ndarray
    io: np.ndarray
    s: np.ndarray
    scores: Any  # attribution [d_sae]
    resid: Any  # [n, seq, d] residual at the site (pre-clamp)
    seconds: float


def _single_token(tok: Any, word: str) -> int:
    ids = tok.tokenizer.encode(" " + word, add_special_tokens=False).ids
    return int(ids[-1])


def prepare(cfg: Config, model: Any = None, tok: Any = None, sae: tuple | None = None) -> Prepared:
    """Prompts, tokens and the attribution scores (independent of K, budget and constraint)."""
    t0 = time.time()
    if model is None:
        model, tok = C.load_model(cfg.model_dir, cfg.dtype)
    site, sae_, path = sae if sae is not None else S.resolve_sae(cfg.sae[0] if cfg.sae else "", cfg.layers[0])
    prompts = D.ioi_prompts(cfg.n_prompts, seed=cfg.seed, template_kind=cfg.template_kind,
                            template_index=cfg.template_index)
    tokens, valid = encode_batch(tok, [p.text for p in prompts])
    if not valid.all():
        raise SystemExit("ioi: prompts of one template tokenised to different lengths; END slots differ.")
    io = np.asarray([_single_token(tok, p.io) for p in prompts], np.int32)
    s = np.asarray([_single_token(tok, p.s) for p in prompts], np.int32)
    end = tokens.shape[1] - 1

    def one(mdl, t, v, i, si):
        return S.resid_and_grad(mdl, t, v, site, lambda logits: logits[end, i] - logits[end, si])

    resid, grad = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0)))(
        model, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(io), jnp.asarray(s))
    mask = jnp.zeros(tokens.shape, bool).at[:, end].set(True)
    # grad of the batch-MEAN diff = per-prompt grad / n
    scores = F.attribution(sae_, resid, grad / len(prompts), mask)
    return Prepared(cfg, model, tok, site, sae_, path, prompts, tokens, valid, io, s, scores, resid, time.time() - t0)


def make_clamp(prep: Prepared, k: int) -> tuple[Clamp, str]:
    feats = F.top_attribution(prep.scores, k)
    mode = "zero" if prep.cfg.clamp_value == 0 else "negative_on_positive"
    return Clamp(prep.sae, feats, jnp.full((k,), prep.cfg.clamp_value, jnp.float32), mode=mode), mode


def _examples(prep: Prepared, idx: np.ndarray, suffix: int = 0) -> R.Example:
    """Per-prompt examples (n_var = 1); with ``suffix`` > 0, ``suffix`` '!' tokens are appended and the
    delta rows / readout sit on them."""
    tok = prep.tok
    tokens, valid = prep.tokens[idx], prep.valid[idx]
    seq = tokens.shape[1]
    if suffix:
        bang = tok.tokenizer.encode("!", add_special_tokens=False).ids[-1]
        tokens = np.concatenate([tokens, np.full((len(idx), suffix), bang, np.int32)], axis=1)
        valid = np.concatenate([valid, np.ones((len(idx), suffix), bool)], axis=1)
        slots = np.arange(seq, seq + suffix, dtype=np.int32)
    else:
        slots = np.asarray([seq - 1], np.int32)
    n, total = tokens.shape
    readout = total - 1
    measure = np.zeros(total, bool)
    measure[slots] = True
    return R.Example(
        tokens=jnp.asarray(tokens[:, None, :]),
        valid=jnp.asarray(valid[:, None, :]),
        delta_slots=jnp.asarray(np.broadcast_to(slots, (n, len(slots))).copy()),
        measure_mask=jnp.asarray(np.broadcast_to(measure, (n, total)).copy()),
        target=O.LogitDiffTarget(
            slot=jnp.full((n, 1), readout, jnp.int32), io=jnp.asarray(prep.io[idx][:, None]),
            s=jnp.asarray(prep.s[idx][:, None]),
        ),
    )


def _shared_example(prep: Prepared, idx: np.ndarray) -> R.Example:
    """The authors' formulation: ONE example whose variants are all the prompts (shared delta)."""
    seq = prep.tokens.shape[1]
    measure = np.zeros(seq, bool)
    measure[seq - 1] = True
    ex = R.Example(
        tokens=jnp.asarray(prep.tokens[idx]), valid=jnp.asarray(prep.valid[idx]),
        delta_slots=jnp.asarray([seq - 1], jnp.int32), measure_mask=jnp.asarray(measure),
        target=O.LogitDiffTarget(slot=jnp.full((len(idx),), seq - 1, jnp.int32), io=jnp.asarray(prep.io[idx]),
                                 s=jnp.asarray(prep.s[idx])),
    )
    return jax.tree.map(lambda a: a[None], ex)


def head_knockout(prep: Prepared, max_heads: int, scan_prompts: int = 16) -> tuple[Any, list[tuple[int, int]], np.ndarray]:
    """The circuit-ablation defence: heads above the SAE site knocked out by functional surgery.

    Every head of every block after the site is knocked out alone (``surgery.knockout_heads``) on the
    first ``scan_prompts`` prompts; heads are ranked by the mean logit diff left, and the top 1, 2, 4,
    ... (at most ``max_heads``) are knocked out together until at least half of the prompts with a
    positive clean diff flip. Returns ``(defended model, [(layer, head)], diff under knockout [n])``;
    runs from the cached residual at the site, so the blocks below it are never recomputed."""
    from jaxrecover.sae import surgery as surgery
    from jaxrecover.model.transformer import run_blocks, unembed

    model, site, end = prep.model, prep.site, prep.tokens.shape[1] - 1
    start, stop = site.layer + 1, model.cfg.n_layers  # resid_post of L enters block L+1

    def diffs(mdl, resid, valid, io, s):
        def one(r, v, i, si):
            h, _ = run_blocks(mdl, r, start, stop, valid=v)
            lg = unembed(mdl, h[end:])[0]
            return lg[i] - lg[si]
        return jax.vmap(one)(resid, valid, io, s)

    f = jax.jit(diffs)
    args = lambda n: (prep.resid[:n], jnp.asarray(prep.valid[:n]), jnp.asarray(prep.io[:n]), jnp.asarray(prep.s[:n]))
    clean = np.asarray(f(model, *args(len(prep.prompts))))
    heads = [(layer, h) for layer in range(start, stop) for h in range(model.cfg.n_heads)]
    left = [float(np.mean(f(surgery.knockout_heads(model, layer, [h]), *args(scan_prompts)))) for layer, h in heads]
    ranked = [heads[i] for i in np.argsort(left)]

    def knocked_out(chosen):
        mdl = model
        for layer in sorted({layer for layer, _ in chosen}):
            mdl = surgery.knockout_heads(mdl, layer, [h for lay, h in chosen if lay == layer])
        return mdl

    m = 1
    while True:
        chosen = ranked[: min(m, max_heads)]
        defended = knocked_out(chosen)
        diff = np.asarray(f(defended, *args(len(prep.prompts))))
        if np.sum((clean > 0) & (diff <= 0)) >= 0.5 * np.sum(clean > 0) or m >= max_heads:
            return defended, chosen, diff
        m *= 2


def case(prep: Prepared, k: int) -> D_.Case:
    """The clamp of the top-K attribution features, the clean and clamped diff of every prompt (one
    prefix + one clamped + one clean pass each), and its valid flips: clean > 0 and clamped <= 0."""
    cfg = prep.cfg
    clamp, mode = make_clamp(prep, k)
    site, clamps = prep.site, {prep.site: clamp}
    n = len(prep.prompts)
    ex_all = _examples(prep, np.arange(n))
    problem = R.RecoveryProblem(delta_site=site, clamp_sites=(site,))
    probe = R.make_solver(problem, R.RecoveryConfig(steps=0, lr=cfg.lr, constraint="none"), O.logit_diff,
                          O.logit_diff_success)
    ctx, _ = jax.jit(jax.vmap(probe.init, in_axes=(None, 0, None)))(prep.model, ex_all, clamps)
    clean, clamped = np.asarray(ctx.base_objective), np.asarray(ctx.clamped_objective)
    is_flip = (clean > 0) & (clamped <= 0)
    flips = np.nonzero(is_flip)[0]
    slot = prep.tokens.shape[1] - 1
    h_def = jax.vmap(lambda r: clamp(r, jnp.arange(r.shape[0], dtype=jnp.int32)))(prep.resid)
    info = {
        "n_features": k, "clamp_mode": mode, "clamp_value": cfg.clamp_value, "budget": None,
        "n_prompts": n, "n_valid_flips": int(len(flips)),
        "mean_h_def_norm_end": float(jnp.mean(jnp.linalg.norm(h_def[:, slot], axis=-1))),
        "mean_clean_diff_flips": float(clean[flips].mean()) if len(flips) else None,
        "mean_clamped_diff_flips": float(clamped[flips].mean()) if len(flips) else None,
        "mean_clean_diff_all": float(clean.mean()), "mean_clamped_diff_all": float(clamped.mean()),
    }
    records = [{"prompt": int(i), "text": p.text, "io": p.io, "s": p.s, "clean_diff": float(clean[i]),
                "clamped_diff": float(clamped[i]), "valid_flip": bool(is_flip[i])} for i, p in enumerate(prep.prompts)]
    return D_.Case(clamps, ex_all, is_flip, records, O.logit_diff, O.logit_diff_success, info, site)


def methods(prep: Prepared, case: D_.Case, used: np.ndarray) -> list[D_.Method]:
    """Unconstrained and encoder-projected, one delta row per prompt at END (or one shared delta)."""
    shared = _shared_example(prep, used) if prep.cfg.shared_delta else None
    tag = "shared" if shared is not None else f"K={case.info['n_features']}"
    return [D_.Method(m, m, solve_on=shared, replay=m == "none", desc=f"ioi {m} {tag}") for m in ("none", "encoder")]


def contrasts(prep: Prepared, case: D_.Case, used: np.ndarray) -> tuple[list[D_.Method], dict[str, Any]]:
    """The head-knockout defence recovered with an unconstrained delta, and the soft suffix."""
    cfg, out, info = prep.cfg, [], {}
    clean = np.asarray([r["clean_diff"] for r in case.records])
    if cfg.knockout_heads:
        with C.stage("head knockout (surgery): select heads"):
            defended, heads, knocked = head_knockout(prep, cfg.knockout_heads)
        kflips = np.nonzero((clean > 0) & (knocked <= 0))[0]
        kused = kflips[: cfg.max_flips] if cfg.max_flips else kflips
        S.say(f"ioi: head knockout {[f'{layer}.{h}' for layer, h in heads]}: {len(kflips)} of {len(clean)} prompts flip")
        info["head_knockout"] = {"heads": [f"{layer}.{h}" for layer, h in heads], "n_valid_flips": int(len(kflips)),
                                 "n_recovered_on": int(len(kused)), "mean_knocked_diff": float(knocked.mean())}
        krec = [{**case.records[i], "clamped_diff": float(knocked[i]), "valid_flip": True} for i in kused]
        out.append(D_.Method("head_knockout", model=defended, clamps={}, examples=S.take(case.examples, kused),
                             records=krec, desc="ioi head knockout"))
    if cfg.suffix:
        out.append(D_.Method("soft_suffix", delta_site=Site(0, "resid_pre"), examples=_examples(prep, used, cfg.suffix_len),
                             random_control=False, desc="ioi soft suffix"))
    return out, info


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    modes = res["modes"]
    show = [m for m in ("none", "encoder", "soft_suffix", "replay_clamped_feature", "replay_sae_residual", "head_knockout") if m in modes]
    rows = [{"metric": "valid flips (clean>0, clamped<=0)", **{m: f"{res['n_valid_flips']}/{res['n_prompts']}" for m in show[:1]},
             "paper none": PAPER["valid_flips"], "paper encoder": PAPER["valid_flips"]}]
    spec = [
        ("recovery (diff > 0)", "recovered", "rate"),
        ("mean recovered logit diff", "final_objective", "mean"),
        ("act drift L2 (abs)", "drift_abs", "mean"),
        ("decode drift L2", "decode_drift", "mean"),
        ("reactivated fraction", "react_frac", "mean"),
        ("zero-reactivation recovery", "zero_reactivation", "count"),
        ("random direction, same norm (replayed)", "random_dir", "rate"),
        ("||delta||", "delta_norm", "mean"),
        ("||delta|| / ||h_def||", "delta_rel", "mean"),
    ]
    for label, key, kind in spec:
        row: dict[str, Any] = {"metric": label}
        for m in show:
            row[m] = S.count_cell(modes[m], key) if kind == "count" else S.cell(modes[m], key)
        row["paper none"] = PAPER["none"].get(key, "--")
        row["paper encoder"] = PAPER["encoder"].get(key, "--")
        rows.append(row)
    rows.append({"metric": "mean clean / clamped diff (flips)",
                 show[0] if show else "none": f"{res['mean_clean_diff_flips']:.2f} / {res['mean_clamped_diff_flips']:.2f}"
                 if res["mean_clean_diff_flips"] is not None else "--",
                 "paper none": f"{PAPER['clean_diff']} / {PAPER['clamped_diff']}", "paper encoder": ""})
    return rows


def notes(prep: Prepared, res: dict[str, Any]) -> str:
    cfg = prep.cfg
    return (
        f"SAE: `{prep.sae_path}` at `{prep.site}`; K={res['n_features']} attribution features, clamp mode "
        f"`{res['clamp_mode']}` (value {res['clamp_value']}). Recovery on the first {res['n_recovered_on']} of "
        f"{res['n_valid_flips']} valid flips; Adam lr {cfg.lr}, {cfg.steps} steps, budget {res['budget']}; "
        f"{'one delta shared by the flips (authors code)' if cfg.shared_delta else 'one delta per prompt (paper)'}. "
        f"Mean ||h_def|| at END = {res['mean_h_def_norm_end']:.1f} (paper budget 20 is a GPT-2 residual scale). "
        "Rates: Wilson 95%; means: bootstrap 95% (2000 resamples). Paper: GPT-2 small, JB SAE layer 4, 64 prompts, "
        "shared delta, clamp -5 in code. Soft suffix drift is read pre-clamp at the SAE site over the suffix slots. "
        "Replay rows re-run the unconstrained delta's clamped-feature part dz_S W_dec[S] and SAE-residual part "
        "delta - dz W_dec alone, under the clamp."
        + (f" Head knockout (circuit ablation by functional surgery, no SAE clamp): heads {hk['heads']} "
           f"(layer.head) zeroed; {hk['n_valid_flips']} prompts flip (clean > 0, knocked out <= 0); the "
           f"head_knockout column recovers {hk['n_recovered_on']} of them with an unconstrained delta at the "
           "same site, budget, steps and lr." if (hk := res.get("head_knockout")) else "")
        + "\n"
    )


def plot(out: Path, res: dict[str, Any]) -> None:
    modes = list(res["modes"])
    report.bar_plot(out / "ioi.png", ["recovery", "act drift L2", "decode drift", "react frac"],
                    {m: [res["modes"][m]["recovered"]["rate"],
                         res["modes"][m].get("drift_abs", {}).get("mean") or 0.0,
                         res["modes"][m].get("decode_drift", {}).get("mean") or 0.0,
                         res["modes"][m].get("react_frac", {}).get("mean") or 0.0] for m in modes},
                    ylabel="value", title=f"IOI recovery (K={res['n_features']}, budget {res['budget']})")


SETTING = D_.Setting(name=NAME, title="IOI circuit-level recovery (paper §5.3, Fig. 4)", Config=Config,
                     prepare=prepare, case=case, methods=methods, contrasts=contrasts, table_rows=table_rows,
                     notes=notes, plot=plot)


def main(cfg: Config) -> dict[str, Any]:
    return D_.run(SETTING, cfg)
