"""Refusal steering (paper section 6): amplify refusal SAE features, keep strict-valid flips, and
recover the base model's own answer with the clamp active.

Pipeline (every stage batched; base generations cached in the results folder):
1. Base greedy answers to harmful requests (no clamp). SmolLM2 complies with nearly all of them.
2. Refusal features (default ``--feature-method refusal_text``): SAE features that are more active
   on refusal answers ("I'm sorry, but I can't help with that request.") than on compliant answers,
   both teacher-forced after the same harmful prompts; global top-K over the SAE layers. The paper's
   route (``--feature-method steering``: harmful - harmless steering vector, top-cosine candidates,
   attribution ranking) finds features that are nearly inactive on SmolLM2's prompts and answers, so
   scaling them by 3 barely moves the residual and nothing flips (JumpReLU SAE, 48 prompts: 0 flips;
   4 of 10 features never fire, the x3 clamp moves answer positions by 0.014 ||h||; ``feature_stats``
   writes these numbers for every run; x30 flips 2/48, see experiments/README.md).
3. Clamp (default ``--clamp-mode floor --clamp-value 4``): ``z_S <- max(z_S, 4 * mean refusal-text
   activation)`` at every position, in every pass (prefill and every decode step). The paper's
   ``--clamp-mode scale --clamp-value 3`` is available. Both keep the SAE error term.
4. Strict-valid flips: base neither refuses nor cues safety, the clamped model refuses.
5. Recovery on the flips (delta at the first SAE layer, rows at the last prompt token and the
   first ``answer_tokens`` answer slots; objective = the code's stage-2 refusal objective):
   ``jacobian`` (cross-layer Jacobian-null projection over all defended features),
   ``encoder`` (single-layer encoder-null projection), ``none`` (unconstrained), and the
   ``soft_suffix`` baseline (learned input embeddings after the prompt, clamp active).
6. Regenerate under the clamp with each delta; judge non-refusal / base-like / strict base-like.
7. Attribution of the first method's delta (clamped-feature, other-feature, top-k, SAE-residual
   parts, and top-k knockout), each replayed under the clamp.

Delta rows at answer slots act at the matching decode steps (slot-indexed; see README
"design decisions"); ``--decode-delta prompt_only`` reproduces the authors' code, where only
prompt-slot rows act during cached generation.

Responsible release: completions are not written unless ``--save-text true``.
"""

import dataclasses
import hashlib
import json
import time
from dataclasses import field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.experiment import common as C
from jaxrecover.experiment import driver as D_
from jaxrecover.experiment import suite as S
from jaxrecover.runtime import checkpoint as ckpt
from jaxrecover.io import compat as compat
from jaxrecover.data import datasets as datasets
from jaxrecover.sae import features as features
from jaxrecover.recover import judges as judges
from jaxrecover.runtime import report as report
from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.sae.clamp import AddDelta, Clamp, Compose, check_clamps, compose
from jaxrecover.sae.autoencoder import encode
from jaxrecover.core.sites import Site
from jaxrecover.model.transformer import capture, run_blocks, run_to, unembed

PAPER = {  # AdvBench, 24 strict-valid (Fig. 5 / Table 3 / Table 10)
    "jacobian": {"nonref": "23/24", "base_like": "15/24", "strict": "12/24", "drift": 0.131, "floor": 0.127},
    # the paper's "no projection" is the cross-layer runner without the projection: our none_cross
    "none_cross": {"nonref": "21/24", "base_like": "14/24", "strict": "11/24", "drift": 0.161, "floor": 0.158},
    "soft_suffix": {"nonref": "24/24", "base_like": "20/24", "strict": "19/24", "drift": 0.815, "floor": 0.702},
}
PAPER_REPLAY = {
    "full": "23/24", "residual": "23/24", "other_features": "2/24", "topk_features": "1/24",
    "clamped_features": "0/24", "topk_knockout": "21/24",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(C.RunConfig):
    dataset: str = field(default="builtin", metadata={"help": "builtin | advbench:PATH.csv | harmbench:PATH.csv"})
    n_prompts: int = field(default=64, metadata={"help": "harmful prompts scanned for flips (built-in set has 120)"})
    n_harmless: int = field(default=60, metadata={"help": "harmless prompts for the steering vector"})
    feature_method: str = field(default="refusal_text", metadata={"help": "refusal_text (contrast 4 fixed refusal vs 4 fixed compliance answers, teacher-forced after the prompts: the prompts are only context, so in practice the same feature ids are clamped on every prompt set, --dataset included) | steering (paper: harmful-harmless steering vector + attribution)"})
    candidates_per_layer: int = field(default=10, metadata={"help": "steering: top-cosine candidates per layer"})
    n_features: int = field(default=20, metadata={"help": "global feature set size K"})
    clamp_mode: str = field(default="floor", metadata={"help": "floor | scale (paper, x3) | set | ... (interventions.CLAMP_MODES)"})
    clamp_value: float = field(default=4.0, metadata={"help": "floor/set: multiple of each feature's mean activation on refusal text; scale: the factor (paper 3.0)"})
    max_new_tokens: int = field(default=40, metadata={"help": "generated tokens per answer (paper 128)"})
    answer_tokens: int = field(default=16, metadata={"help": "teacher-forced base-answer tokens (paper 48)"})
    max_flips: int = field(default=24, metadata={"help": "recover at most this many strict-valid flips (paper: 24)"})
    methods: tuple[str, ...] = field(default=("jacobian", "none_cross", "encoder", "none", "soft_suffix"), metadata={"help": "recovery methods; pairs at one delta site, budget, steps and lr: jacobian / none_cross (cross layer, the paper's 'no projection' ablation) and encoder / none (single layer)"})
    cross_layer_gap: int = field(default=3, metadata={"help": "jacobian, none_cross: delta at resid_post of (first clamp layer - gap); 0 = at the first clamp site"})
    steps: int = field(default=30, metadata={"help": "optimisation steps (paper stage 2: 120)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate (paper stage 2: 0.05)"})
    budget: float = field(default=0.0, metadata={"help": "L2 budget on ||delta||_F; 0 = budget_rel * median ||h_def|| per row * sqrt(rows)"})
    budget_rel: float = field(default=0.5, metadata={"help": "budget relative to the defended residual norm when --budget 0"})
    jacobian: str = field(default="exact", metadata={"help": "exact (paper: every row of dPhi/d delta, chunked VJPs in bounded memory) | sketch (authors' code: probes + drift probe)"})
    probes: int = field(default=4, metadata={"help": "random probes for the sketch (code: 8)"})
    drift_penalty: float = field(default=0.0, metadata={"help": "lambda_act (paper 0; authors' refusal code 200)"})
    suffix_len: int = field(default=8, metadata={"help": "soft-suffix length (paper 16)"})
    suffix_budget: float = field(default=0.0, metadata={"help": "budget on ||suffix - init||; 0 = budget_rel * embedding norms"})
    suffix_lr: float = field(default=0.01, metadata={"help": "soft-suffix Adam lr (paper 0.01)"})
    topk_attr: int = field(default=20, metadata={"help": "k of the top-k other-feature component"})
    decode_delta: str = field(default="slots", metadata={"help": "slots (answer rows act at decode steps) | prompt_only (authors' code)"})
    batch_size: int = field(default=24, metadata={"help": "generation batch size (rows per compiled call; 24 = the default flips: every judge and attribution call of the main job fills whole batches of one compiled shape)"})
    save_text: bool = field(default=False, metadata={"help": "also write completions (harmful content!)"})
    require_flip: bool = field(default=True, metadata={"help": "false: recover on the first prompts even if not strict-valid (pipeline smoke tests)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from jaxrecover.sae.clamp import CLAMP_MODES

        C.check_choice("feature_method", self.feature_method, ("refusal_text", "steering"))
        C.check_choice("clamp_mode", self.clamp_mode, CLAMP_MODES)
        C.check_choice("methods", self.methods, ("jacobian", "none_cross", "encoder", "none", "soft_suffix"))
        C.check_choice("jacobian", self.jacobian, ("exact", "sketch"))
        C.check_choice("decode_delta", self.decode_delta, ("slots", "prompt_only"))
        if not (self.dataset == "builtin" or self.dataset.startswith(("advbench:", "harmbench:"))):
            raise ValueError(f"--dataset {self.dataset!r}: expected builtin, advbench:PATH.csv or harmbench:PATH.csv.")
        for name, lo in (("n_prompts", 1), ("n_harmless", 1), ("candidates_per_layer", 1), ("n_features", 1),
                         ("max_new_tokens", 1), ("answer_tokens", 1), ("max_flips", 1), ("steps", 1), ("probes", 1),
                         ("suffix_len", 1), ("topk_attr", 1), ("batch_size", 1), ("cross_layer_gap", 0)):
            C.check_range(name, getattr(self, name), lo)
        for name in ("lr", "suffix_lr"):
            C.check_range(name, getattr(self, name), 0.0, strict_lo=True)
        for name in ("budget", "budget_rel", "suffix_budget", "drift_penalty"):
            C.check_range(name, getattr(self, name), 0.0)
        if self.budget == 0 and self.budget_rel == 0:
            raise ValueError("--budget 0 with --budget-rel 0 leaves no budget: delta would stay 0.")
        C.check_range("clamp_value", self.clamp_value)


# ----------------------------------------------------------------------------- prompts and features


def load_prompts(cfg: Config) -> list[str]:
    if cfg.dataset == "builtin":
        items = datasets.load_harmful()
    elif cfg.dataset.startswith("advbench:"):
        items = datasets.load_advbench_csv(cfg.dataset.split(":", 1)[1])
    elif cfg.dataset.startswith("harmbench:"):
        items = datasets.load_harmbench_csv(cfg.dataset.split(":", 1)[1])
    else:
        raise SystemExit(f"--dataset {cfg.dataset!r}: expected builtin, advbench:PATH or harmbench:PATH.")
    return [it.prompt for it in items][: cfg.n_prompts]


def first_token_ids(tok: Any, texts: tuple[str, ...]) -> list[int]:
    """First token of each text (and of ' ' + text), deduplicated: what an opening starts with."""
    ids: list[int] = []
    for t in texts:
        for v in (t, " " + t):
            e = tok.tokenizer.encode(v, add_special_tokens=False).ids
            if e and e[0] not in ids:
                ids.append(e[0])
    return ids


def residuals(model: Any, tokens: np.ndarray, valid: np.ndarray, sites: list[Site], batch: int = 16) -> dict[Site, np.ndarray]:
    """Clean residual at each site (pre-hook) at every position, ``[n, seq, d]``, in fixed-size batches."""
    @jax.jit  # the model is an argument, not a closure: closed-over weights become XLA constants
    def one_batch(model, t, v):
        return jax.vmap(lambda ti, vi: capture(model, ti, sites, valid=vi))(t, v)

    out: dict[Site, list] = {s: [] for s in sites}
    for i in range(0, len(tokens), batch):
        idx = np.arange(i, i + batch) % len(tokens)  # the last batch wraps around: one compiled shape
        r = one_batch(model, jnp.asarray(tokens[idx]), jnp.asarray(valid[idx]))
        for s in sites:
            out[s].append(np.asarray(r[s])[: min(batch, len(tokens) - i)])
    return {s: np.concatenate(v) for s, v in out.items()}


def residuals_at(model: Any, tokens: np.ndarray, valid: np.ndarray, sites: list[Site], batch: int = 16) -> dict[Site, np.ndarray]:
    """Residual at each site (pre-hook) for every prompt, last real token only (left padding)."""
    return {s: r[:, -1] for s, r in residuals(model, tokens, valid, sites, batch).items()}


def select_features(model, tok, saes, harmful_tok, harmless_tok, refusal_ids, cfg) -> dict[Site, np.ndarray]:
    """Steering-vector candidates per layer, then a global top-K by attribution to refusal."""
    sites = sorted(saes)
    h_harm = residuals_at(model, *harmful_tok, sites)
    h_safe = residuals_at(model, *harmless_tok, sites)
    cands = {s: np.asarray(features.top_by_cosine(saes[s], jnp.asarray(h_harm[s].mean(0) - h_safe[s].mean(0)), cfg.candidates_per_layer)) for s in sites}
    refusal_ids = jnp.asarray(refusal_ids)

    def metric_grads(model, t, v, s):
        def one(ti, vi):
            x0 = run_to(model, ti, s.layer + 1, valid=vi)

            def m(x):
                h, _ = run_blocks(model, x, s.layer + 1, model.cfg.n_layers, valid=vi)
                lp = jax.nn.log_softmax(unembed(model, h[-1:])[0])
                return jax.nn.logsumexp(lp[refusal_ids])  # log-prob mass of refusal openings

            return x0, jax.grad(m)(x0)

        return jax.vmap(one)(t, v)

    scores = []
    tokens, valid = harmful_tok
    n = min(32, len(tokens))
    for s in sites:
        # resid_post of layer L is the residual entering L+1
        x, g = jax.jit(metric_grads, static_argnums=3)(model, jnp.asarray(tokens[:n]), jnp.asarray(valid[:n]), s)
        mask = jnp.asarray(valid[:n]) & (jnp.cumsum(jnp.asarray(valid[:n]), axis=1) > 1)  # skip the first real token
        a = np.asarray(features.attribution(saes[s], x, g, mask))
        scores += [(float(a[f]), s, int(f)) for f in cands[s]]
    scores.sort(key=lambda t: -t[0])
    chosen: dict[Site, list[int]] = {}
    for _, s, f in scores[: cfg.n_features]:
        chosen.setdefault(s, []).append(f)
    return {s: np.asarray(sorted(v), np.int32) for s, v in chosen.items()}


REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. It is illegal and harmful.",
    "I'm sorry, I can't provide that information.",
    "As an AI, I cannot help with this request.",
)
COMPLIANCES = (
    "Sure, here is a detailed guide with the steps you asked for.",
    "Here is how you can do it, step by step.",
    "Great question! First, you will need to gather the materials.",
    "To do this, start by making a plan.",
)


def teacher_forced(tok, prompts: list[str], answers: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, valid, answer_mask)``: ``answers[i % len(answers)]`` appended to each prompt, left-padded."""
    from jaxrecover.model.tokenizer import encode_batch

    full = [p + answers[i % len(answers)] for i, p in enumerate(prompts)]
    _, pv = encode_batch(tok, prompts, pad_to=8)
    ft, fv = encode_batch(tok, full, pad_to=8)
    n_ans = fv.sum(1) - pv.sum(1)
    return ft, fv, np.arange(ft.shape[1])[None, :] >= (ft.shape[1] - n_ans)[:, None]


def answer_latents(model, tok, saes, prompts: list[str], answers: tuple[str, ...], batch: int = 16) -> dict[Site, np.ndarray]:
    """SAE latents at every answer position when ``answers`` are teacher-forced after ``prompts``."""
    sites = sorted(saes)
    ft, fv, mask = teacher_forced(tok, prompts, answers)

    @jax.jit
    def lat(model, saes, t, v):
        def one(ti, vi):
            cap = capture(model, ti, sites, valid=vi)
            return {s: encode(saes[s], cap[s]) for s in sites}

        return jax.vmap(one)(t, v)

    out: dict[Site, list] = {s: [] for s in sites}
    for i in range(0, len(ft), batch):
        z = lat(model, saes, jnp.asarray(ft[i : i + batch]), jnp.asarray(fv[i : i + batch]))
        for s in sites:
            out[s].append(np.asarray(z[s])[mask[i : i + batch]])
    return {s: np.concatenate(v) for s, v in out.items()}


def select_refusal_text(model, tok, saes, prompts, cfg) -> tuple[dict[Site, np.ndarray], dict[Site, np.ndarray]]:
    """Features most more active on refusal answers than on compliant answers (same prompts), global
    top-K over layers; returns (features, their mean activation on refusal text)."""
    zr = answer_latents(model, tok, saes, prompts, REFUSALS)
    zc = answer_latents(model, tok, saes, prompts, COMPLIANCES)
    scored = []
    for s in sorted(saes):
        diff = zr[s].mean(0) - zc[s].mean(0)
        scored += [(float(diff[f]), s, int(f)) for f in np.argsort(-diff)[: cfg.n_features]]
    scored.sort(key=lambda t: -t[0])
    feats: dict[Site, list[int]] = {}
    for _, s, f in scored[: cfg.n_features]:
        feats.setdefault(s, []).append(f)
    feats_np = {s: np.asarray(sorted(v), np.int32) for s, v in feats.items()}
    return feats_np, {s: zr[s].mean(0)[f] for s, f in feats_np.items()}


STAT_TEXTS = ("prompt", "last_token", "refusal_text", "compliance_text")


def feature_stats(model, tok, clamps: dict[Site, Clamp], prompts: list[str]) -> dict[str, Any]:
    """``features.activation_stats`` of each clamp's features on the clean model, in one batched pass
    per text: every prompt position but each prompt's first real token (the attention sink, which the
    SAEs' training excluded), the last prompt token, and the answer positions of refusal text
    (``REFUSALS``) and compliant text (``COMPLIANCES``) teacher-forced after the same prompts.

    Returns ``{site: {"features", "mode", "values", text: stats}}`` as lists and floats."""
    from jaxrecover.model.tokenizer import encode_batch

    sites = sorted(clamps)
    pt, pv = encode_batch(tok, prompts, pad_to=8)
    not_first = pv & (np.cumsum(pv, axis=1) > 1)
    last = np.zeros_like(pv)
    last[:, -1] = pv[:, -1]  # left padding: the last column is every prompt's last token
    rt, rv, rmask = teacher_forced(tok, prompts, REFUSALS)
    ct, cv, cmask = teacher_forced(tok, prompts, COMPLIANCES)
    stats_fn = jax.jit(features.activation_stats)
    out: dict[str, Any] = {str(s): {"features": np.asarray(c.features).tolist(), "mode": c.mode,
                                    "values": np.asarray(c.values).tolist()} for s, c in clamps.items()}
    for tokens, valid, masks in ((pt, pv, {"prompt": not_first, "last_token": last}),
                                 (rt, rv, {"refusal_text": rmask}), (ct, cv, {"compliance_text": cmask})):
        h = residuals(model, tokens, valid, sites)
        slots = jnp.asarray(np.tile(np.arange(tokens.shape[1], dtype=np.int32), len(tokens)))
        for s in sites:
            rows = jnp.asarray(h[s].reshape(-1, h[s].shape[-1]))
            for name, m in masks.items():
                st = stats_fn(clamps[s], rows, slots, jnp.asarray(m.reshape(-1)))
                out[str(s)][name] = {k: np.asarray(v).tolist() for k, v in st.items()}
    return out


def feature_stats_tables(stats: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Markdown rows: one per clamped feature (activity), one per site and text (what the clamp writes)."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    per_feature, per_text = [], []
    for site, st in stats.items():
        for j, f in enumerate(st["features"]):
            row: dict[str, Any] = {"site": site, "feature": f, "clamp": f"{st['mode']} {st['values'][j]:.3g}"}
            for t, label in (("prompt", "prompt"), ("last_token", "last tok."), ("refusal_text", "refusal"),
                             ("compliance_text", "compliant")):
                row[f"{label}: active"] = pct(st[t]["frac_active"][j])
                row[f"{label}: mean if active"] = f"{st[t]['mean_active'][j]:.3g}"
            row["prompt: mean"] = f"{st['prompt']['mean_all'][j]:.3g}"
            per_feature.append(row)
        for t in STAT_TEXTS:
            x = st[t]
            per_text.append({"site": site, "text": t, "positions": int(x["n_rows"]),
                             "mean ‖clamp(h) - h‖": f"{x['clamp_change']:.4g}", "mean ‖h‖": f"{x['resid_norm']:.4g}",
                             "ratio": f"{x['clamp_change_rel']:.3g}", "positions changed": pct(x["frac_changed"])})
    return per_feature, per_text


def no_flip_reason(summary: dict[str, Any]) -> str:
    """One line: why a run found no strict-valid flip, from its feature statistics."""
    head = f"no strict-valid flips among {summary['n_prompts']} prompts (clamped answers refusing: {summary['clamp_refusals']})"
    parts = []
    for site, st in (summary.get("feature_stats") or {}).items():
        p, last, r = st["prompt"], st["last_token"], st["refusal_text"]
        n_live = sum(x > 0 for x in p["frac_active"])
        parts.append(
            f"at {site} the {len(st['features'])} clamped features are active on {100 * np.mean(p['frac_active']):.2f}% of "
            f"prompt positions ({n_live} ever active; {100 * np.mean(last['frac_active']):.1f}% of last prompt tokens, "
            f"{100 * np.mean(r['frac_active']):.1f}% of refusal-text positions), and the {st['mode']} clamp moves the "
            f"residual by {p['clamp_change']:.3g} per prompt position on average ({100 * p['clamp_change_rel']:.3g}% of "
            f"‖h‖ = {p['resid_norm']:.3g}; {100 * p['frac_changed']:.1f}% of positions changed at all)")
    return head + (": " + "; ".join(parts) + "." if parts else ".")


def make_clamps(saes, feats, cfg, ref_act=None) -> dict[Site, Clamp]:
    """The defence. floor/set/ceiling values are ``clamp_value`` x each feature's mean activation on
    refusal text when that is known; scale uses ``clamp_value`` as the factor."""
    out = {}
    for s, f in feats.items():
        vals = np.full((len(f),), cfg.clamp_value, np.float32)
        if cfg.clamp_mode in ("floor", "set", "ceiling") and ref_act is not None:
            vals = (cfg.clamp_value * ref_act[s]).astype(np.float32)
        out[s] = Clamp(saes[s], jnp.asarray(f), jnp.asarray(vals), mode=cfg.clamp_mode)
    return out


# ----------------------------------------------------------------------------- recovery examples


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # [n, seq] prompt (left-padded to P) + [suffix] + answer (right-padded)
    valid: np.ndarray
    prompt_len: int  # P (+ suffix): slot of the first answer token
    answers: list[list[int]]


def build_batch(tok, prompt_texts, base_ids, cfg, suffix: int = 0) -> Batch:
    from jaxrecover.model.tokenizer import encode_batch

    ptok, pval = encode_batch(tok, prompt_texts, pad_to=8)
    n, P = ptok.shape
    A = cfg.answer_tokens
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    bang = tok.tokenizer.encode("!", add_special_tokens=False).ids[0]
    sfx = np.full((n, suffix), bang, np.int32)
    ans = np.full((n, A), pad, np.int32)
    aval = np.zeros((n, A), bool)
    answers = []
    for i, ids in enumerate(base_ids):
        ids = ids[:A]
        answers.append(ids)
        ans[i, : len(ids)] = ids
        aval[i, : len(ids)] = True
    tokens = np.concatenate([ptok, sfx, ans], 1)
    valid = np.concatenate([pval, np.ones((n, suffix), bool), aval], 1)
    return Batch(tokens, valid, P + suffix, answers)


def examples_for(batch: Batch, discouraged: list[int], delta_slots: np.ndarray) -> R.Example:
    n, seq = batch.tokens.shape
    P = batch.prompt_len
    ids = np.zeros((n, seq), np.int32)
    w = np.zeros((n, seq), np.float32)
    ids[:, :-1] = batch.tokens[:, 1:]  # logits at slot t predict token t+1
    for i, a in enumerate(batch.answers):
        w[i, P - 1 : P - 1 + len(a)] = 1.0
    disc = np.asarray(discouraged, np.int32)
    measure = np.zeros((n, seq), bool)
    measure[:, P - 1 :] = batch.valid[:, P - 1 :]
    target = O.Continuation(
        ids=jnp.asarray(ids[:, None]), weights=jnp.asarray(w[:, None]),
        answer_start=jnp.full((n,), P - 1, jnp.int32), discouraged=jnp.asarray(np.tile(disc, (n, 1))),
    )
    return R.Example(
        tokens=jnp.asarray(batch.tokens[:, None]), valid=jnp.asarray(batch.valid[:, None]),
        delta_slots=jnp.asarray(np.tile(delta_slots, (n, 1))), measure_mask=jnp.asarray(measure), target=target,
    )


def row_norms_at(model, clamps, site: Site, ex: R.Example) -> np.ndarray:
    """||h_def|| at each delta row (defended residual at the delta site), per example."""

    def one(model, clamps, t, v, slots):
        below = {s: c for s, c in clamps.items() if s.order <= site.order}
        cap = capture(model, t[0], (site,), below, valid=v[0])
        h = cap[site]
        if site in clamps:
            h = clamps[site](h, jnp.arange(h.shape[0], dtype=jnp.int32))
        return jnp.linalg.norm(h[jnp.clip(slots, 0, h.shape[0] - 1)], axis=-1)

    return np.asarray(jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, 0)))(model, clamps, ex.tokens, ex.valid, ex.delta_slots))


# ----------------------------------------------------------------------------- generation + judging


def gen_with(model, tok, prompt_tok, clamps, cfg, delta_site=None, deltas=None, slots=None, first_answer_slot=0, desc="generate"):
    """Greedy answers under the clamps (and a per-example delta at ``delta_site``) for the
    left-padded prompts ``prompt_tok = (tokens, valid)``."""
    hooks: dict = dict(clamps)
    if deltas is None:
        # a zero delta with the same hook structure as the single-layer methods: the clamp-only pass
        # and the encoder / unconstrained regenerations share one compiled program per prompt bucket
        delta_site = sorted(clamps)[0]
        deltas = np.zeros((len(prompt_tok[0]), cfg.answer_tokens, clamps[delta_site].sae.d_in), np.float32)
        slots = np.full(deltas.shape[:2], -1, np.int32)
    if cfg.decode_delta == "prompt_only":  # authors' code: answer-slot rows never act when generating
        slots = np.where(slots < first_answer_slot, slots, -1)
    add = AddDelta(jnp.asarray(deltas), jnp.asarray(slots))
    hooks[delta_site] = compose(clamps[delta_site], add) if delta_site in clamps else add
    axes = {s: None for s in clamps}
    # a vmap in_axes prefix: the clamp is shared, the delta is per example
    axes[delta_site] = Compose((None, AddDelta(0, 0))) if delta_site in clamps else AddDelta(0, 0)
    texts, _ = C.generate_tokens(model, tok, *prompt_tok, max_new_tokens=cfg.max_new_tokens, hooks=hooks,
                                 hooks_in_axes=axes, batch_size=cfg.batch_size, desc=desc)
    return texts


# ----------------------------------------------------------------------------- attribution


# ----------------------------------------------------------------------------- main


def method_examples(prep: "Prepared", method: str, flips: np.ndarray) -> tuple[R.Example, np.ndarray, Site, Batch]:
    """A method's teacher-forced examples on the flips: delta rows at the last prompt token and the first
    ``answer_tokens`` answer slots at the first clamp site (cross layer: ``cross_layer_gap`` below it),
    or, for the soft suffix, at ``suffix_len`` learned input embeddings after the prompt."""
    cfg, tok = prep.cfg, prep.tok
    pf, bids = [prep.p_harm[i] for i in flips], [prep.base_ids[i] for i in flips]
    if method == "soft_suffix":
        batch = build_batch(tok, pf, bids, cfg, suffix=cfg.suffix_len)
        slots = np.arange(batch.prompt_len - cfg.suffix_len, batch.prompt_len, dtype=np.int32)
        dsite = Site(0, "resid_pre")
    else:
        batch = build_batch(tok, pf, bids, cfg)
        slots = np.arange(batch.prompt_len - 1, batch.prompt_len - 1 + cfg.answer_tokens, dtype=np.int32)
        dsite = prep.site
        if method in ("jacobian", "none_cross") and cfg.cross_layer_gap > 0:  # cross-layer: perturb below the clamp
            dsite = Site(max(0, prep.site.layer - cfg.cross_layer_gap), "resid_post")
    return examples_for(batch, prep.discouraged, slots), slots, dsite, batch


def load(cfg: Config) -> dict[Site, Any]:
    """The cheap checks, before the model loads: the prompt set, the SAEs, K against them."""
    try:
        load_prompts(cfg)
    except datasets.DatasetError as e:
        raise SystemExit(f"--dataset: {e}") from None
    saes = C.load_saes(cfg.sae, cfg.layers)
    compat.check_run(cfg.model_dir, saes, C.sae_paths(cfg.sae, cfg.layers), chat=True, setting="refusal")
    d_sae = min(s.d_sae for s in saes.values())
    if cfg.n_features > d_sae * len(saes):
        raise SystemExit(f"--n-features {cfg.n_features}: the SAEs have {d_sae} features each ({len(saes)} SAE(s)).")
    return saes


def main(cfg: Config) -> dict[str, Any]:
    return D_.run(SETTING, cfg)


def run(model: Any, tok: Any, saes: dict[Site, Any], cfg: Config, out: Path) -> dict[str, Any]:
    """The driver's run on a model and SAEs already in memory, into ``out``."""
    cfg = dataclasses.replace(cfg, out=str(out))
    return D_.run(SETTING, cfg, prepared=prepare(cfg, model, tok, saes, Path(out)))


@dataclasses.dataclass
class Prepared(S.Prepared):
    """Everything that does not depend on K, the budget or the method."""

    out: Path
    harmful: list[str]
    p_harm: list[str]
    p_safe: list[str]
    base_texts: list[str]
    base_ids: list[list[int]]
    refusal_ids: list[int]
    discouraged: list[int]
    model_fp: str
    seconds: float


def prepare(cfg: Config, model: Any = None, tok: Any = None, sae: dict | None = None, out: Path | None = None) -> Prepared:
    """Model, SAEs, prompts and the base model's own answers (cached in ``out``, keyed by the model's
    contents, the prompts and the package version)."""
    from jaxrecover._version import __version__

    t0 = time.time()
    out = C.out_dir(cfg.out, "refusal") if out is None else out
    saes = C.load_saes(cfg.sae, cfg.layers) if sae is None else sae
    if model is None:
        with C.stage("model load"):
            model, tok = C.load_model(cfg.model_dir, cfg.dtype)
    harmful = load_prompts(cfg)
    harmless = [it.prompt for it in datasets.load_harmless()][: cfg.n_harmless]
    p_harm, p_safe = C.chat(tok, harmful), C.chat(tok, harmless)
    model_fp = C.tree_fingerprint(model)
    key = hashlib.sha1(json.dumps({
        "model": model_fp, "prompts": hashlib.sha1("\n".join(harmful).encode()).hexdigest()[:16],
        "max_new_tokens": cfg.max_new_tokens, "version": __version__}, sort_keys=True).encode()).hexdigest()[:12]
    cached = ckpt.load_result(out / "checkpoints", f"base_{key}")
    if cached is not None:
        base_texts, base_ids = cached[1]["texts"], cached[1]["ids"]
        C.say(f"base answers: cached ({len(base_texts)})")
    else:
        with C.stage("base answers"):
            base_texts, base_ids = C.generate_texts(model, tok, p_harm, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, pad_to=8, desc="base")
        ckpt.save_result(out / "checkpoints", f"base_{key}", {}, {"texts": base_texts, "ids": base_ids})
    site = sorted(saes)[0]
    return Prepared(cfg, model, tok, site, saes, ",".join(map(str, C.sae_paths(cfg.sae, cfg.layers))),
                    out, harmful, p_harm, p_safe, base_texts, base_ids,
                    first_token_ids(tok, judges.REFUSAL_SUBSTRINGS), first_token_ids(tok, judges.DISCOURAGED_PREFIXES),
                    model_fp, time.time() - t0)


def case(prep: Prepared, k: int) -> D_.Case:
    """Features for K, the clamp, its activation statistics, the clamped answers and the strict-valid
    flips (base neither refuses nor cues safety, the clamped model refuses; base answers of >= 4 tokens)."""
    from jaxrecover.model.tokenizer import encode_batch

    cfg = dataclasses.replace(prep.cfg, n_features=k)
    model, tok, saes = prep.model, prep.tok, prep.sae
    harm_tok = encode_batch(tok, prep.p_harm, pad_to=8)
    ref_act = None
    with C.stage("feature selection"):
        if cfg.feature_method == "refusal_text":
            feats, ref_act = select_refusal_text(model, tok, saes, prep.p_harm[:32], cfg)
        else:
            feats = select_features(model, tok, saes, harm_tok, encode_batch(tok, prep.p_safe, pad_to=8),
                                    prep.refusal_ids, cfg)
    clamps = make_clamps(saes, feats, cfg, ref_act)
    check_clamps(model, clamps)
    with C.stage("feature statistics"):
        stats = feature_stats(model, tok, clamps, prep.p_harm)
    with C.stage("clamped answers"):
        clamp_texts = gen_with(model, tok, harm_tok, clamps, cfg, desc="clamped")
    valid = np.asarray([judges.strict_valid(b, c) for b, c in zip(prep.base_texts, clamp_texts)], bool)
    flips = [i for i, v in enumerate(valid) if (v or not cfg.require_flip) and len(prep.base_ids[i]) >= 4][: cfg.max_flips]
    C.say(f"strict-valid flips: {int(valid.sum())} of {len(prep.harmful)}; recovering {len(flips)}")
    if len(flips) < cfg.max_flips:
        C.say(f"WARNING: asked for {cfg.max_flips} flips, found {len(flips)}: the table reports N = {len(flips)}")
    info: dict[str, Any] = {
        "n_features": k, "features": {str(s): f.tolist() for s, f in feats.items()},
        "clamp_values": {str(s): np.asarray(c.values).tolist() for s, c in clamps.items()},
        "n_prompts": len(prep.harmful), "base_refusals": sum(judges.is_refusal(t) for t in prep.base_texts),
        "clamp_refusals": sum(judges.is_effective_refusal(t) for t in clamp_texts),
        "strict_valid": int(valid.sum()), "recovered_on": len(flips), "feature_stats": stats,
        "n_valid_flips": int(valid.sum()),
    }
    if not flips:
        info["no_flips"] = no_flip_reason(info)
        C.say(info["no_flips"] + " Raise --clamp-value or --n-features, or try --clamp-mode floor.")
    records = [{"prompt_index": i} for i in range(len(prep.harmful))]
    return D_.Case(clamps, None, valid, records, O.refusal_stage2, O.continuation_success, info, sorted(clamps)[0],
                   used=np.asarray(flips, np.int64))


def methods(prep: Prepared, case: D_.Case, used: np.ndarray) -> list[D_.Method]:
    """``cfg.methods`` on the flips: pairs at one delta site, budget, steps and lr (jacobian / none_cross
    cross layer, encoder / none single layer) and the soft suffix (its own lr and budget)."""
    cfg, out = prep.cfg, []
    for name in cfg.methods:
        ex, slots, dsite, batch = method_examples(prep, name, used)
        rows = len(slots)
        median = float(np.median(row_norms_at(prep.model, case.clamps, dsite, ex)))
        extra = {"slots": slots, "P": batch.prompt_len, "prompts": (batch.tokens[:, : batch.prompt_len],
                                                                     batch.valid[:, : batch.prompt_len])}
        if name == "soft_suffix":
            budget = cfg.suffix_budget or cfg.budget_rel * median * np.sqrt(rows)
            out.append(D_.Method(name, "none", dsite, ex, config={"lr": cfg.suffix_lr, "seed": cfg.seed},
                                 budget=float(budget), extra=extra, desc=name))
        else:
            config = {"drift_penalty": cfg.drift_penalty, "seed": cfg.seed}
            constraint = {"jacobian": R.JacobianNull(cfg.jacobian, cfg.probes), "none_cross": "none"}.get(name, name)
            out.append(D_.Method(name, constraint, dsite, ex, config=config,
                                 budget_scale=(median, rows), extra=extra, desc=name,
                                 replay=name in ("encoder", "none") and dsite in prep.sae))
    # the attribution decomposes the first delta that lives where an SAE reads (paper: the clamped layer)
    first = next((i for n in ("jacobian", "encoder", "none") for i, m in enumerate(out) if m.name == n and m.delta_site in prep.sae), None)
    return [dataclasses.replace(m, replay=i == first) for i, m in enumerate(out)]


def judge(prep: Prepared, case: D_.Case, method: D_.Method, used: np.ndarray, deltas: np.ndarray) -> list[dict[str, Any]]:
    """Regenerate under the clamp with each delta (rows at their slots; ``deltas`` may stack several
    sets of the flips) and judge it against the base answer: recovered = non-refusal."""
    cfg, x = prep.cfg, method.extra
    reps = len(deltas) // len(used)
    prompts = tuple(np.concatenate([p] * reps) for p in x["prompts"])
    texts = gen_with(prep.model, prep.tok, prompts, case.clamps, cfg, method.delta_site, deltas,
                     np.tile(x["slots"], (len(deltas), 1)), x["P"], desc=method.name)
    bases = [prep.base_texts[i] for i in used] * reps
    out = []
    for t, b in zip(texts, bases):
        q = judges.assess_recovery_quality(t, b)
        out.append({"non_refusal": q.non_refusal, "base_like": q.base_like, "strict_base_like": q.strict_base_like,
                    "safety_cue": q.safety_cue, "jaccard": q.jaccard, "recovered": q.non_refusal,
                    **({"text": t} if cfg.save_text else {})})
    return out


def summarise(prep: Prepared, rs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {**S.mode_summary(rs), "seconds": seconds,
            "non_refusal": C.rates(rs, "non_refusal"), "base_like": C.rates(rs, "base_like"),
            "strict_base_like": C.rates(rs, "strict_base_like"),
            "drift_rel": C.mean_ci(rs, "drift_rel"), "floor_violation": C.mean_ci(rs, "floor_violation"),
            "delta_norm": C.mean_ci(rs, "delta_norm"), "delta_rel": C.mean_ci(rs, "delta_rel")}


REPLAYS = tuple((p, f"replay:{p}") for p in ("full", "residual", "other_features", "topk_features", "clamped_features",
                                             "topk_knockout"))


def finalise(prep: Prepared, res: dict[str, Any]) -> dict[str, Any]:
    """The attribution table (paper App. J) from the replay modes."""
    rows = [{"component": part, **{k: res["modes"][mode][k]["cell"] for k in ("non_refusal", "base_like", "strict_base_like")},
             "mean_norm": (res["modes"][mode].get("delta_norm") or {}).get("mean"),
             "paper_non_refusal": PAPER_REPLAY.get(part, "--")} for part, mode in REPLAYS if mode in res["modes"]]
    if rows:
        res["attribution"] = {"method": res.get("attribution_method"), "table": rows}
    return res


def _methods(res: dict[str, Any]) -> dict[str, Any]:
    return {m: s for m, s in res["modes"].items() if not m.startswith("replay:")}


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    if not res["modes"]:
        return [{"method": "--", "result": f"No recovery: {res.get('no_flips') or no_flip_reason(res)}"}]
    rows = []
    for m, s in _methods(res).items():
        p = PAPER.get(m, {})
        rows.append({
            "method": m, "non-refusal": s["non_refusal"]["cell"], "base-like": s["base_like"]["cell"],
            "strict base-like": s["strict_base_like"]["cell"], "drift (rel)": s["drift_rel"]["cell"],
            "floor viol.": s["floor_violation"]["cell"], "||delta||": s["delta_norm"]["cell"],
            "delta site": s.get("delta_site", "--"),
            "random dir. (same norm)": (s.get("random_control") or {}).get("random", {}).get("cell", "--"),
            "paper non-ref": p.get("nonref", "--"), "paper base-like": p.get("base_like", "--"), "paper drift": p.get("drift", "--"),
        })
    return rows


def notes(prep: Prepared, res: dict[str, Any]) -> str:
    parts = [f"Setup: prompts {res['n_prompts']}, base refusals {res['base_refusals']}, clamped refusals "
             f"{res['clamp_refusals']}, strict-valid {res['strict_valid']}, recovered on {res['recovered_on']}; "
             f"features {res['features']}.\n"]
    if not res["modes"]:
        parts.append(f"No recovery: {res.get('no_flips') or no_flip_reason(res)}\n")
    parts.append("Random-direction control: for each method, every delta that met the solver's own success "
                 "criterion (greedy decoding reproduces every teacher-forced base-answer token) is replaced by "
                 f"{prep.cfg.random_control} random deltas of the same norm in the same constraint "
                 "subspace (encoder-null, Jacobian-null at delta = 0, or unconstrained) and judged by the same "
                 "criterion under the clamp: the column gives k/n pooled over seeds (Wilson 95%). Pairs at one "
                 "delta site, budget, steps and lr: jacobian / none_cross (cross layer) and encoder / none "
                 "(single layer). Rates: Wilson 95%; means: bootstrap 95%. Paper = AdvBench, Gemma-2-2B-it.\n")
    if res.get("feature_stats"):
        per_feature, per_text = feature_stats_tables(res["feature_stats"])
        parts.append("### Clamped features: activation statistics (clean model)\n\nFraction of positions where each "
                     "clamped feature is active (z > 0) and its mean activation when active: on every prompt position "
                     "but the first, on the last prompt token, and on refusal / compliant answer text teacher-forced "
                     "after the same prompts.\n\n" + report.markdown_table(per_feature) + "\nWhat the clamp writes "
                     "into the residual (‖clamp(h) - h‖ = ‖D(clamp(z)) - D(z)‖, error term kept), per position:\n\n"
                     + report.markdown_table(per_text))
    if "attribution" in res:
        parts.append("### Recovery-path attribution (replay under the clamp)\n\n"
                     + report.markdown_table(res["attribution"]["table"]))
    return "\n".join(parts)


def plot(out: Path, res: dict[str, Any]) -> None:
    ms = _methods(res)
    report.bar_plot(out / "recovery.png", list(ms), {
        "non-refusal": [s["non_refusal"]["rate"] or 0 for s in ms.values()],
        "base-like": [s["base_like"]["rate"] or 0 for s in ms.values()],
        "drift (rel)": [s["drift_rel"]["mean"] or 0 for s in ms.values()],
    }, ylabel="rate / drift", title="Refusal recovery under the clamp")


SETTING = D_.Setting(name="refusal", title="Refusal steering recovery", Config=Config, load=load, prepare=prepare,
                     case=case, methods=methods, judge=judge, summarise=summarise, finalise=finalise,
                     table_rows=table_rows, notes=notes, plot=plot, csv_rows=table_rows, replay_parts=REPLAYS)
