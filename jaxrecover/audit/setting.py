"""The audit as a setting of the one driver (``jaxrecover.experiment.driver``), and ``run_audit``.

Stages (``driver.run``): ``load`` (every cheap check: prompt rows, model spec, SAEs against the model,
feature ids, clamp values, tokens; before any weight loads), ``prepare`` (model, base answers cached
in ``<out>/checkpoints``, SAE latents on the selection prompts), ``case`` (the clamp, what it does to
the base behaviour: the valid flips), then the driver's method loop (one joint solve per method, budget
absolute or relative to the defended residual norm), random-direction control, attribution replays,
the resume store, stage timings and the output folder every setting writes (results.jsonl,
summary.json, table.md, audit.csv, audit.png).

Delta site: the first clamp site in model order; every method perturbs there (the encoder-null
projection is defined at a clamp site). Several SAEs clamp at several sites at once.
"""

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.audit import behaviours as B
from jaxrecover.audit.config import AuditConfig, load_config
from jaxrecover.core.sites import Site
from jaxrecover.experiment import common as C
from jaxrecover.experiment import driver as D
from jaxrecover.experiment import suite as S
from jaxrecover.io import compat
from jaxrecover.recover import judges
from jaxrecover.runtime import report
from jaxrecover.sae.clamp import AddDelta, Clamp, Compose, check_clamps, compose

NAME = "audit"
_MSG_NO_SAE = (
    "model {model}: no SAE named; the shipped SAEs are for the embedded default only. Set sae = [PATH] (an SAE "
    "trained on this model; `jaxrecover train-sae --model {model} --layer N --out DIR` makes one) or "
    "sae_release + sae_id."
)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What ``load`` checked, before any model weight is read."""

    folder: str  # the model folder ('' = the embedded default)
    saes: dict  # {Site: SAE}, in model order
    labels: dict  # {Site: where the SAE came from}
    features: dict  # {Site: np.ndarray of explicit ids} (explicit rule)
    values: dict  # {Site: np.ndarray of clamp values}
    rows: list
    contrast: list
    tok: Any
    chat: bool  # prompts go through the chat template


# ----------------------------------------------------------------------------- load: every cheap check


def _sae_paths(cfg: AuditConfig) -> list[str]:
    from jaxrecover.io import resolve

    if cfg.sae:
        return [str(resolve.resolve_sae(p)) for p in cfg.sae]
    if cfg.sae_release:
        return [str(resolve.resolve_sae(release=cfg.sae_release, sae_id=i)) for i in cfg.sae_id]
    if cfg.model:
        raise compat.fail(_MSG_NO_SAE.format(model=cfg.model))
    from jaxrecover.io.shipped import shipped_sae

    try:
        return [str(shipped_sae(9, release="jumprelu"))]
    except FileNotFoundError as e:
        raise compat.fail(f"sae: none named, and the embedded default's shipped SAE is missing: {e}") from None


def _model_facts(cfg: AuditConfig) -> tuple[Any, Any]:
    """``(ModelFacts, resolve.ModelSpec or None)`` without converting or loading anything."""
    from jaxrecover.io import resolve

    if not cfg.model:
        return compat.model_facts(""), None
    named = resolve.classify_model(cfg.model)
    if named.kind == "gguf":
        return compat.gguf_facts(named.path), named
    return compat.model_facts(named.path), named


def _explicit(cfg: AuditConfig, saes: Mapping[Site, Any], labels: Mapping[Site, str],
              sites: Sequence[Site]) -> dict[Site, np.ndarray]:
    """``features`` keys (an SAE's position "0", "1", ... in the order the SAEs are named, or its site
    string) -> sites, ids checked."""
    out: dict[Site, np.ndarray] = {}
    for key, ids in cfg.features:
        if key.isdigit():
            if int(key) >= len(sites):
                raise compat.fail(f"features: list {key} given, but {len(sites)} SAE(s) are named.")
            site = sites[int(key)]
        else:
            try:
                site = Site.parse(key)
            except ValueError:
                raise compat.fail(f"features: {key!r} is not a site (expected blocks.L.hook_resid_post, ...).") from None
            if site not in saes:
                raise compat.fail(f"features: no SAE at {key}; the SAEs are at {', '.join(map(str, sites))}.")
        if site in out:
            raise compat.fail(f"features: {site} is given twice.")
        checked = compat.check_feature_ids(list(ids), int(saes[site].d_sae), labels[site], flag="features")
        if checked:
            out[site] = np.asarray(checked, np.int32)
    return out


def _values(cfg: AuditConfig, features: Mapping[Site, np.ndarray], k: int, sites: Sequence[Site]) -> dict[Site, np.ndarray]:
    """One clamp value per feature per site: one value for all, or one per explicit feature (in order)."""
    vals = np.asarray(cfg.clamp_value, np.float32)
    if cfg.clamp_rule != "explicit":
        return {s: np.full((k,), vals[0], np.float32) for s in sites}
    total = sum(len(f) for f in features.values())
    if len(vals) not in (1, total):
        raise compat.fail(f"clamp_value: {len(vals)} values for {total} explicit features; give one, or one per feature.")
    if len(vals) == 1:
        return {s: np.full((len(f),), vals[0], np.float32) for s, f in features.items()}
    out, i = {}, 0
    for s, f in features.items():
        out[s], i = vals[i : i + len(f)], i + len(f)
    return out


def load(cfg: AuditConfig) -> Loaded:
    """Every check of an audit that needs no model weights; one line (exit 2) for each failure."""
    from jaxrecover.io import resolve
    from jaxrecover.recover import projections as proj
    from jaxrecover.sae.files import load_sae

    rows = B.read_rows("prompts", cfg.prompts, cfg.behaviour, cfg.n_prompts)
    selects = cfg.clamp_rule != "explicit"  # the explicit rule never reads the contrast file
    contrast = B.read_texts("contrast_prompts", cfg.contrast_prompts, cfg.n_contrast) if selects else []
    try:
        facts, named = _model_facts(cfg)
        paths = _sae_paths(cfg)
    except resolve.ResolveError as e:
        raise compat.fail(str(e)) from None
    saes, labels = {}, {}
    for p in paths:
        try:  # float32: encode computes in the SAE's dtype (a bf16 encoder reads as drift of latents that did not move)
            sae = load_sae(p, dtype="float32")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise compat.fail(f"sae {p}: not a readable SAE ({type(e).__name__}: {e}).") from None
        site = compat.sae_site(sae.hook_name, p, flag="sae")
        if site in saes:
            raise compat.fail(f"sae {p}: a second SAE at {site} (after {labels[site]}); one SAE per site.")
        saes[site], labels[site] = sae, p
    given = list(saes)  # the order the config names them (what features' list positions refer to)
    saes = dict(sorted(saes.items()))
    labels = {s: labels[s] for s in saes}
    warnings = [w for s in saes for w in compat.check_sae(facts, saes[s], labels[s], flag="sae")]
    compat.check_tokenizer(facts, chat=cfg.needs_chat, setting=f"audit ({cfg.behaviour})")
    features = _explicit(cfg, saes, labels, given) if cfg.clamp_rule == "explicit" else {}
    for s in saes:
        if cfg.clamp_rule != "explicit" and cfg.n_features > saes[s].d_sae:
            raise compat.fail(f"n_features {cfg.n_features}: the SAE {labels[s]} has {saes[s].d_sae} features.")
        k = len(features.get(s, ())) if cfg.clamp_rule == "explicit" else cfg.n_features
        if "encoder" in cfg.methods:
            try:
                proj.check_encoder_null_space(int(saes[s].d_in), k)
            except ValueError as e:
                raise compat.fail(f"methods encoder at {s}: {e}") from None
    values = _values(cfg, features, cfg.n_features, list(saes))
    for w in dict.fromkeys(warnings):
        C.say(w)
    folder = _folder(cfg, named, facts)
    tok = _tokenizer(folder)
    B.check_tokens(rows, cfg, tok)
    return Loaded(folder, saes, labels, features, values, rows, contrast, tok, _use_chat(cfg, tok))


def _use_chat(cfg: AuditConfig, tok: Any) -> bool:
    """chat auto: refusal always; continuation when the model has a chat template (an instruct model
    answers a raw prompt with end-of-turn at once); choice / logit_diff read raw prompts."""
    if cfg.chat != "auto":
        return cfg.chat == "true"
    return cfg.behaviour == "refusal" or (cfg.behaviour == "continuation" and tok.chat_template is not None)


def _folder(cfg: AuditConfig, named: Any, facts: Any) -> str:
    """The model folder ('' = the embedded default); a .gguf is converted once into the cache here,
    after every check above (so a bad SAE never costs a conversion)."""
    from jaxrecover.io import resolve
    from jaxrecover.io.gguf import GGUFError

    if named is None:
        return ""
    try:
        folder = resolve.resolve_model(cfg.model, say=C.say)
    except GGUFError as e:
        raise compat.fail(f"model {cfg.model}: {e}") from None
    if named.kind == "gguf":  # the template check needs the converted folder
        compat.check_tokenizer(compat.model_facts(folder), chat=cfg.needs_chat, setting=f"audit ({cfg.behaviour})")
    return str(folder)


def _tokenizer(folder: str) -> Any:
    from jaxrecover.io import embedded
    from jaxrecover.model.tokenizer import load_tokenizer

    return load_tokenizer(Path(folder) if folder else embedded.default_model_dir())


# ----------------------------------------------------------------------------- prepare


@dataclasses.dataclass
class Prepared(S.Prepared):
    loaded: Loaded
    texts: list  # the prompts as the model sees them (chat template applied when asked)
    base_ids: list  # continuation / refusal: the base model's greedy answer tokens
    base_texts: list
    z_pos: dict  # {Site: [rows, d_sae]} SAE latents on the prompts (selection / relative values)
    z_neg: dict  # {Site: [rows, d_sae]} on the contrast prompts
    out: Path
    discouraged: list
    seconds: float
    lr_used: float = 0.0  # the Adam lr the methods ran with (lr, or lr_rel x the residual's RMS coordinate)


def _latents(model: Any, tok: Any, saes: Mapping[Site, Any], texts: Sequence[str]) -> dict[Site, np.ndarray]:
    """SAE latents at every real token but the first of each text (the attention sink, which SAE
    training leaves out) -> ``{site: [rows, d_sae]}``."""
    from jaxrecover.model.tokenizer import encode_batch
    from jaxrecover.paper.refusal import residuals
    from jaxrecover.sae.autoencoder import encode

    tokens, valid = encode_batch(tok, list(texts), pad_to=8)
    keep = valid & (np.cumsum(valid, axis=1) > 1)
    h = residuals(model, tokens, valid, list(saes))
    enc = jax.jit(encode)
    return {s: np.asarray(enc(saes[s], jnp.asarray(h[s][keep]))) for s in saes}


def _base_answers(cfg: AuditConfig, model: Any, tok: Any, texts: list[str], out: Path) -> tuple[list, list]:
    """The base model's greedy answers, cached in ``<out>/checkpoints`` (keyed by the model's contents,
    the prompts and the length)."""
    from jaxrecover import _version
    from jaxrecover.runtime import checkpoint as ckpt

    key = hashlib.sha1(json.dumps({"model": C.tree_fingerprint(model), "texts": hashlib.sha1("\n".join(texts).encode()).hexdigest(),
                                   "max_new_tokens": cfg.max_new_tokens, "version": _version.__version__},
                                  sort_keys=True).encode()).hexdigest()[:12]
    cached = ckpt.load_result(out / "checkpoints", f"base_{key}")
    if cached is not None:
        C.say(f"base answers: cached ({len(cached[1]['texts'])})")
        return cached[1]["texts"], cached[1]["ids"]
    with C.stage("base answers"):
        from jaxrecover.model.tokenizer import encode_batch

        tokens, valid = encode_batch(tok, texts, pad_to=8)
        base_texts, base_ids = C.generate_tokens(model, tok, tokens, valid, max_new_tokens=cfg.max_new_tokens,
                                                 batch_size=cfg.batch_size, desc="base")
    ckpt.save_result(out / "checkpoints", f"base_{key}", {}, {"texts": base_texts, "ids": base_ids})
    return base_texts, base_ids


def prepare(cfg: AuditConfig, model: Any = None, tok: Any = None, sae: Loaded | None = None) -> Prepared:
    """Model, prompts, base answers and the selection latents (independent of the clamp and the method)."""
    t0 = time.time()
    loaded = sae if sae is not None else load(cfg)
    out = C.out_dir(cfg.out, NAME)
    if model is None:
        with C.stage("model load"):
            model, tok = C.load_model(loaded.folder, cfg.dtype)
    tok = tok if tok is not None else loaded.tok
    texts = [B.prompt_text(r, cfg.behaviour, cfg.choice_format) for r in loaded.rows]
    if loaded.chat:
        texts = C.chat(tok, texts)
    base_texts, base_ids = _base_answers(cfg, model, tok, texts, out) if cfg.judged else ([], [])
    z_pos, z_neg = {}, {}
    if cfg.clamp_rule != "explicit" or cfg.relative_value:
        with C.stage("selection latents"):
            z_pos = _latents(model, tok, loaded.saes, texts)
            if loaded.contrast:
                ctexts = C.chat(tok, loaded.contrast) if loaded.chat else list(loaded.contrast)
                z_neg = _latents(model, tok, loaded.saes, ctexts)
    from jaxrecover.paper.refusal import first_token_ids

    disc = first_token_ids(tok, judges.DISCOURAGED_PREFIXES) if cfg.behaviour == "refusal" else []
    site = next(iter(loaded.saes))
    return Prepared(cfg, model, tok, site, dict(loaded.saes), ",".join(loaded.labels.values()), loaded, texts,
                    base_ids, base_texts, z_pos, z_neg, out, disc, time.time() - t0)


# ----------------------------------------------------------------------------- the defence and its flips


def select(prep: Prepared, k: int) -> dict[Site, np.ndarray]:
    """The clamped features per site: explicit, or top-k by the selection rule."""
    cfg = prep.cfg
    if cfg.clamp_rule == "explicit":
        return dict(prep.loaded.features)
    from jaxrecover.sae import features as F

    out = {}
    for s in prep.sae:
        zp, zn = prep.z_pos[s], prep.z_neg[s]
        if cfg.clamp_rule == "contrast":
            score = zp.mean(0) - zn.mean(0)
            out[s] = np.sort(np.argsort(-score, kind="stable")[:k]).astype(np.int32)
        else:
            ids = F.forget_retain(jnp.asarray(zp), jnp.asarray(zn), k, retain_threshold=cfg.retain_threshold)
            out[s] = np.sort(np.asarray(ids)).astype(np.int32)
    return out


def make_clamps(prep: Prepared, feats: Mapping[Site, np.ndarray]) -> dict[Site, Clamp]:
    cfg, out = prep.cfg, {}
    for s, f in feats.items():
        vals = prep.loaded.values[s][: len(f)] if cfg.clamp_rule != "explicit" else prep.loaded.values[s]
        vals = np.broadcast_to(vals, (len(f),)).astype(np.float32)
        if cfg.relative_value:  # x each feature's mean activation where it fires on the prompts
            z = prep.z_pos[s][:, f]
            active = np.where(z > 0, z, 0.0).sum(0) / np.maximum((z > 0).sum(0), 1)
            vals = (vals * active).astype(np.float32)
        out[s] = Clamp(prep.sae[s], jnp.asarray(f), jnp.asarray(vals), mode=cfg.clamp_mode)
    return out


def _generate(prep: Prepared, prompts: tuple, clamps: Mapping[Site, Any], delta_site: Site | None = None,
              deltas: Any = None, slots: Any = None, desc: str = "generate") -> tuple[list[str], list[list[int]]]:
    """Greedy answers under the clamps (plus per-example delta rows at their slots)."""
    hooks: dict = dict(clamps)
    axes: dict = {s: None for s in clamps}
    if deltas is not None:
        add = AddDelta(jnp.asarray(deltas, jnp.float32), jnp.asarray(slots))
        hooks[delta_site] = compose(clamps[delta_site], add) if delta_site in clamps else add
        axes[delta_site] = Compose((None, AddDelta(0, 0))) if delta_site in clamps else AddDelta(0, 0)
    return C.generate_tokens(prep.model, prep.tok, *prompts, max_new_tokens=prep.cfg.max_new_tokens, hooks=hooks,
                             hooks_in_axes=axes if deltas is not None else None, batch_size=prep.cfg.batch_size, desc=desc)


def case(prep: Prepared, k: int) -> D.Case:
    """The clamp at K features per site, and the valid flips it makes (see ``behaviours``)."""
    cfg = prep.cfg
    with C.stage("feature selection"):
        feats = select(prep, k)
    clamps = make_clamps(prep, feats)
    check_clamps(prep.model, clamps)
    objective, success = B.task(cfg.behaviour)
    n = len(prep.texts)
    info: dict[str, Any] = {"behaviour": cfg.behaviour, "clamp_rule": cfg.clamp_rule, "clamp_mode": cfg.clamp_mode,
                            "n_features": int(sum(len(f) for f in feats.values())),
                            "features": {str(s): f.tolist() for s, f in feats.items()},
                            "clamp_values": {str(s): np.asarray(c.values).tolist() for s, c in clamps.items()},
                            "n_prompts": n, "model": cfg.model or "embedded SmolLM2-135M-Instruct", "chat": prep.loaded.chat}
    records: list[dict[str, Any]] = [{"prompt_index": i} for i in range(n)]
    with C.stage("clamp effect"):
        if cfg.judged:
            ans = B.answer_examples(prep.tok, prep.texts, [b[: cfg.answer_tokens] for b in prep.base_ids],
                                    cfg.answer_tokens, prep.discouraged)
            ex, has = ans.examples, np.asarray([len(b) > 0 for b in prep.base_ids])
            forced = B.task("continuation")[1]  # greedy decoding reproduces the teacher-forced answer
            base_ok = B.success_under(prep.model, ex, None, forced) & has
            if cfg.behaviour == "refusal":
                clamped, _ = _generate(prep, (ans.prompt_tokens, ans.prompt_valid), clamps, desc="clamped")
                is_flip = np.asarray([judges.strict_valid(b, c) for b, c in zip(prep.base_texts, clamped)]) & has
                info["clamp_refusals"] = int(sum(judges.is_effective_refusal(t) for t in clamped))
                info["base_refusals"] = int(sum(judges.is_refusal(t) for t in prep.base_texts))
            else:
                is_flip = base_ok & ~B.success_under(prep.model, ex, clamps, forced)
        else:
            ex = B.readout_examples(prep.tok, prep.texts, prep.loaded.rows, cfg)
            base_ok = B.success_under(prep.model, ex, None, success)
            is_flip = base_ok & ~B.success_under(prep.model, ex, clamps, success)
    info["n_base_right"] = int(base_ok.sum())
    for i, r in enumerate(records):
        r["base_right"], r["valid_flip"] = bool(base_ok[i]), bool(is_flip[i])
    C.say(f"audit: {int(is_flip.sum())} valid flips among {n} prompts (base right on {int(base_ok.sum())})")
    return D.Case(clamps, ex, is_flip, records, objective, success, info, next(iter(clamps)))


def methods(prep: Prepared, case: D.Case, used: np.ndarray) -> list[D.Method]:
    """``cfg.methods`` at the first clamp site; the attribution replays the unconstrained delta
    (else the first method's)."""
    cfg = prep.cfg
    extra: dict[str, Any] = {}
    if cfg.judged:  # what the judge regenerates from: the used prompts, the delta slots
        tokens, valid = np.asarray(case.examples.tokens)[used, 0], np.asarray(case.examples.valid)[used, 0]
        P = int(np.asarray(case.examples.target.answer_start)[0]) + 1
        extra = {"prompts": (tokens[:, :P], valid[:, :P]), "slots": np.asarray(case.examples.delta_slots)[0]}
    replay = "none" if "none" in cfg.methods else cfg.methods[0]
    lr = cfg.lr
    if cfg.lr_rel > 0:  # per-coordinate scale of the defended residual where delta acts
        from jaxrecover.paper.refusal import row_norms_at

        median = float(np.median(row_norms_at(prep.model, case.clamps, case.site, S.take(case.examples, used))))
        lr = float(cfg.lr_rel * median / np.sqrt(prep.model.cfg.d_model))
        C.say(f"audit: lr = {cfg.lr_rel} x {median:.4g} / sqrt({prep.model.cfg.d_model}) = {lr:.4g}")
    prep.lr_used = lr
    out = []
    for name in cfg.methods:
        config = {"seed": cfg.seed, "lr": lr}  # jacobian: the exact Jacobian (the strategy's default)
        out.append(D.Method(name, name, config=config, replay=name == replay, extra=extra, desc=f"audit {name}"))
    return out


def judge(prep: Prepared, case: D.Case, method: D.Method, used: np.ndarray, deltas: np.ndarray) -> list[dict[str, Any]]:
    """Regenerate under the clamp with each delta (``deltas`` may stack several sets of the used
    prompts) and judge the text against the base answer. continuation: recovered = the regenerated
    answer starts with the base model's ``answer_tokens`` tokens; refusal: recovered = non-refusal."""
    cfg, x = prep.cfg, method.extra
    reps = len(deltas) // len(used)
    prompts = tuple(np.concatenate([p] * reps) for p in x["prompts"])
    texts, ids = _generate(prep, prompts, case.clamps, method.delta_site or case.site, deltas,
                           np.tile(x["slots"], (len(deltas), 1)), desc=method.name)
    out = []
    for j, (t, got) in enumerate(zip(texts, ids)):
        i = int(used[j % len(used)])
        want = list(prep.base_ids[i][: cfg.answer_tokens])
        q = judges.assess_recovery_quality(t, prep.base_texts[i])
        match = sum(a == b for a, b in zip(got, want)) / max(len(want), 1)
        rec = {"reproduced": list(got[: len(want)]) == want, "token_match": float(match), "base_like": q.base_like,
               "non_refusal": q.non_refusal, "strict_base_like": q.strict_base_like, "jaccard": q.jaccard}
        rec["recovered"] = rec["non_refusal"] if cfg.behaviour == "refusal" else rec["reproduced"]
        if cfg.save_text:
            rec["text"] = t
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- outputs


JUDGED = ("reproduced", "base_like", "non_refusal", "strict_base_like")


def summarise(prep: Prepared, rs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    out = {**S.mode_summary(rs), "seconds": seconds}
    for key in JUDGED:
        if rs and all(key in r for r in rs):
            out[key] = C.rates(rs, key)
    if rs and all("token_match" in r for r in rs):
        out["token_match"] = C.mean_ci(rs, "token_match")
    return out


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    judged = {"continuation": ("base_like", "token_match"), "refusal": ("base_like", "strict_base_like")}
    rows = []
    for m, s in res["modes"].items():
        row = {"method": m, "recovered": S.cell(s, "recovered")}
        for key in judged.get(res.get("behaviour", ""), ()):
            row[key.replace("_", " ")] = S.cell(s, key)
        budget = s.get("budget", res["budget"])
        row.update({"drift (abs)": S.cell(s, "drift_abs"), "drift > 1e-3": S.count_cell(s, "drift_gt_1e-3"),
                    "random dir. (same norm)": (s.get("random_control") or {}).get("random", {}).get("cell", "--"),
                    "||delta||": S.cell(s, "delta_norm"), "||delta|| / ||h_def||": S.cell(s, "delta_rel"),
                    # a replayed part is measured, not solved: it has no budget of its own
                    "budget": "--" if m.startswith("replay") else f"{budget:.3g}"})
        rows.append(row)
    return rows or [{"method": "--", "recovered": f"no valid flips among {res.get('n_prompts', 0)} prompts"}]


def notes(prep: Prepared, res: dict[str, Any]) -> str:
    cfg = prep.cfg
    budget = (f"absolute {cfg.budget}" if cfg.budget else f"relative: {cfg.budget_rel} x median ||h_def|| at the delta "
              "rows x sqrt(rows)")
    lr = (f"lr {prep.lr_used:.4g} (lr_rel {cfg.lr_rel} x the residual's RMS coordinate)" if cfg.lr_rel > 0
          else f"lr {cfg.lr}")
    verdict = {"continuation": "recovered = the answer regenerated under clamp + delta starts with the base model's "
                               f"own {cfg.answer_tokens} greedy tokens (teacher-forced objective: their log-prob); "
                               "base-like = the paper's judge on the regenerated text",
               "refusal": "recovered = the regenerated answer is not a refusal (the refusal setting's judge); flips: "
                          "strict-valid (base complies, clamped refuses)",
               "choice": f"recovered = the right option wins again ({cfg.choice_format}, correct-choice log-softmax)",
               "logit_diff": "recovered = logit[target] > logit[foil] again"}[cfg.behaviour]
    return (f"Model `{res.get('model')}`; SAE(s) `{prep.sae_path}`; clamp rule {cfg.clamp_rule}, mode {cfg.clamp_mode}, "
            f"values {res.get('clamp_values')}; features {res.get('features')}. Prompts `{cfg.prompts}` ({res.get('n_prompts')}"
            f"{', contrast `' + cfg.contrast_prompts + '`' if cfg.contrast_prompts else ''}); base right on "
            f"{res.get('n_base_right')}, valid flips {res.get('n_valid_flips')}, recovered on {res.get('n_recovered_on')}. "
            f"{verdict}. Delta at {prep.site}; Adam {lr}, {cfg.steps} steps; budget {budget}. Random control: "
            f"{cfg.random_control} random deltas of the same norm in the same constraint subspace per recovered delta, "
            "judged by the solver's criterion. Rates: Wilson 95%; means: bootstrap 95%.\n")


def plot(out: Path, res: dict[str, Any]) -> None:
    report.bar_plot(out / "audit.png", ["recovered", "drift abs", "drift > 1e-3"],
                    {m: [s["recovered"]["rate"] or 0.0, (s.get("drift_abs") or {}).get("mean") or 0.0,
                         s["drift_gt_1e-3"]["rate"] or 0.0] for m, s in res["modes"].items() if s.get("n")},
                    ylabel="rate / drift", title=f"Audit: {res.get('behaviour')} under the clamp")


def finalise(prep: Prepared, res: dict[str, Any]) -> dict[str, Any]:
    """The Adam lr the methods ran with goes into summary.json (lr_rel makes it model-dependent)."""
    return {**res, "lr": prep.lr_used}


SETTING = D.Setting(name=NAME, title="Audit of a defence (SAE feature clamp)", Config=AuditConfig, load=load,
                    prepare=prepare, case=case, methods=methods, summarise=summarise, table_rows=table_rows,
                    notes=notes, plot=plot, finalise=finalise)


def setting_for(cfg: AuditConfig) -> D.Setting:
    """The audit setting; judged on regenerated text for continuation and refusal."""
    return dataclasses.replace(SETTING, judge=judge) if cfg.judged else SETTING


def run_audit(config: AuditConfig | str | Path | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Run one audit into ``config.out`` and return its summary (what summary.json holds).

    Args:
        config: an ``AuditConfig``, a TOML file, or a dict of config keys.
        **overrides: config keys that replace the file's (Python values).
    """
    if isinstance(config, AuditConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    elif isinstance(config, Mapping):
        cfg = load_config(None, None, **{**dict(config), **overrides})
    else:
        cfg = load_config(config, None, **overrides)
    return D.run(setting_for(cfg), cfg)
