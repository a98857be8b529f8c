"""TPP latent-level recovery (paper §5.1, Table 2): zero-ablate the SAE features most tied to one class's
linear probe, then recover that probe's logit with a residual delta at every pooled position,
encoder-projected vs unconstrained.

Adapted to the project (paper-notes 2.1):
- Data: ``datasets.load_tpp()`` (300 synthetic bios, 5 professions; a Bias in Bios stand-in), split per
  class into train / test (``--train-frac``, seeded).
- Representation: residual at the SAE site (default ``blocks.9.hook_resid_post``) mean-pooled over the
  valid non-first tokens (the first token is the attention sink, as SAEBench masks BOS). Readout
  "resid": no later layer is run.
- Probes: one-vs-rest logistic regression per class (`jaxrecover.recover.probes`: flax Dense head + TrainState, Adam, class-balanced BCE + L2) on the
  train split.
- Features for target class c: top ``--n-features`` (20) by attribution to the probe logit,
  ``a_f = mean_{train examples of c, pooled positions} z_f * (W_dec[f] . w_c)`` with a_f > 0 first
  (``--selection attribution``), or by decoder alignment ``W_dec[f] . w_c`` (``--selection decoder``,
  ``features.probe_features``). Clamp: "zero" at every position.
- Valid flip: a TEST example of class c whose clean probe logit is > 0 and ablated logit <= 0.
- Recovery: ``objectives.probe_logit`` (success: logit > 0); delta rows at every pooled position,
  ||delta||_F <= ``--budget`` over all rows; Adam lr ``--lr``, ``--steps`` (the paper does not release
  its TPP optimiser settings). All classes' flips run in ONE vmapped solve (per-example clamps).
- Also reported: the TPP ablation effect itself (test accuracy of the target probe and the mean of the
  other probes, clean vs ablated).

Run: ``jaxrecover run tpp``; ``--help`` lists the options.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any


import jax
import jax.numpy as jnp
import numpy as np
from jaxrecover.recover.probes import train_linear_probes

from jaxrecover.experiment import common as C
from jaxrecover.experiment import driver as D_
from jaxrecover.experiment import suite as S
from jaxrecover.data import datasets as D
from jaxrecover.sae import features as F
from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.runtime import report as report
from jaxrecover.sae.clamp import Clamp
from jaxrecover.model.tokenizer import encode_batch

NAME = "tpp"
F_ = dataclasses.field

# paper Table 2, all targets (unweighted mean over 20 target classes), paper-notes 2.1
PAPER = {
    "none": {"recovered": 0.819, "react_frac": 0.013, "drift_abs": 0.094, "zero_reactivation": 0.103, "decode_drift": 0.095},
    "encoder": {"recovered": 0.749, "react_frac": 0.002, "drift_abs": 0.039, "zero_reactivation": 0.680,
                "decode_drift": 0.039},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(C.RunConfig):
    seed: int = F_(default=0, metadata={"help": "split / probe seed"})
    train_frac: float = F_(default=0.6, metadata={"help": "fraction of each class used to train the probes"})
    probe_steps: int = F_(default=400, metadata={"help": "probe training steps (full batch)"})
    probe_lr: float = F_(default=0.01, metadata={"help": "probe Adam learning rate"})
    probe_l2: float = F_(default=1e-3, metadata={"help": "probe L2 penalty"})
    n_features: int = F_(default=200, metadata={"help": "features ablated per target class (20 flips nothing on these easy bios)"})
    selection: str = F_(default="attribution", metadata={"help": "attribution | decoder"})
    max_flips: int = F_(default=0, metadata={"help": "cap on valid flips per class (0 = all)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        C.check_choice("selection", self.selection, ("attribution", "decoder"))
        C.check_range("train_frac", self.train_frac, 0.0, 1.0, strict_lo=True)
        C.check_range("probe_steps", self.probe_steps, 1)
        C.check_range("probe_lr", self.probe_lr, 0.0, strict_lo=True)
        C.check_range("probe_l2", self.probe_l2, 0.0)


@dataclasses.dataclass
class Prepared(S.Prepared):
    labels: list[str]
    y: np.ndarray  # [n] class index
    train: np.ndarray  # [n] bool
    tokens: np.ndarray
    valid: np.ndarray
    pool: np.ndarray  # [n, seq] bool: pooled positions
    resid: Any  # [n, seq, d] at the site (pre-clamp)
    W: Any  # [n_cls, d] probes
    b: Any  # [n_cls]
    probe_acc: dict[str, float]
    seconds: float


def _pooled(resid: Any, pool: Any) -> Any:
    m = pool.astype(resid.dtype)[..., None]
    return (resid * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)


def prepare(cfg: Config, model: Any = None, tok: Any = None, sae: tuple | None = None) -> Prepared:
    t0 = time.time()
    if model is None:
        model, tok = C.load_model(cfg.model_dir, cfg.dtype)
    site, sae_, path = sae if sae is not None else S.resolve_sae(cfg.sae[0] if cfg.sae else "", cfg.layers[0])
    bios = D.load_tpp()
    labels = sorted({b.label for b in bios})
    y = np.asarray([labels.index(b.label) for b in bios], np.int32)
    rng = np.random.default_rng(cfg.seed)
    train = np.zeros(len(bios), bool)
    for c in range(len(labels)):
        idx = rng.permutation(np.nonzero(y == c)[0])
        train[idx[: int(round(cfg.train_frac * len(idx)))]] = True
    tokens, valid = encode_batch(tok, [b.text for b in bios], pad_to=16)
    pool = valid.copy()
    pool[np.arange(len(bios)), np.argmax(valid, axis=1)] = False
    resid = jax.jit(jax.vmap(lambda m, t, v: S.resid_at(m, t, v, site), in_axes=(None, 0, 0)))(
        model, jnp.asarray(tokens), jnp.asarray(valid))
    X = _pooled(resid, jnp.asarray(pool))
    tr = jnp.asarray(train)
    W, b = jax.jit(train_linear_probes, static_argnames=("n_classes", "steps", "lr", "l2", "seed"))(
        X[tr], jnp.asarray(y)[tr], n_classes=len(labels), steps=cfg.probe_steps, lr=cfg.probe_lr, l2=cfg.probe_l2)
    logits = np.asarray(X @ W.T + b[None])
    pred = logits > 0
    Y = y[:, None] == np.arange(len(labels))[None]
    acc = {"train": float((pred[train] == Y[train]).mean()), "test": float((pred[~train] == Y[~train]).mean())}
    S.say(f"tpp: probes trained; one-vs-rest accuracy train {acc['train']:.3f}, test {acc['test']:.3f}")
    return Prepared(cfg, model, tok, site, sae_, path, labels, y, train, tokens, valid, pool, resid, W, b, acc,
                    time.time() - t0)


def select_features(prep: Prepared, c: int, k: int) -> Any:
    if prep.cfg.selection == "decoder":
        return F.probe_features(prep.sae, prep.W[c], k)
    idx = np.nonzero((prep.y == c) & prep.train)[0]  # only the class's train examples carry weight
    resid = prep.resid[idx]
    grad = jnp.broadcast_to(prep.W[c], resid.shape)
    return F.top_attribution(F.attribution(prep.sae, resid, grad, jnp.asarray(prep.pool[idx])), k)


def case(prep: Prepared, k: int) -> D_.Case:
    """Per class, the top-K features of its probe zero-ablated; valid flips are the class's test bios
    whose probe logit the ablation turns from > 0 to <= 0 (at most ``max_flips`` per class)."""
    cfg = prep.cfg
    site = prep.site
    n_cls = len(prep.labels)
    feats = jnp.stack([select_features(prep, c, k) for c in range(n_cls)])  # [n_cls, k]
    slots = jnp.arange(prep.tokens.shape[1], dtype=jnp.int32)
    test = np.nonzero(~prep.train)[0]
    Xc = _pooled(prep.resid[test], jnp.asarray(prep.pool[test]))
    clean_logits = np.asarray(Xc @ prep.W.T + prep.b[None])  # [n_test, n_cls]

    # ablated pooled residual of every test example under every class's clamp: [n_cls, n_test, d]
    # (arrays are arguments, not closed-over constants: XLA would constant-fold the SAE matmuls)
    def ablated(sae, fs, resid, pool):
        clamp = Clamp(sae, fs, jnp.zeros((k,), jnp.float32), mode="zero")
        return _pooled(jax.vmap(lambda r: clamp(r, slots))(resid), pool)

    abl = jax.jit(jax.vmap(ablated, in_axes=(None, 0, None, None)))(
        prep.sae, feats, prep.resid[test], jnp.asarray(prep.pool[test]))
    abl_logits = np.asarray(jnp.einsum("ctd,ed->cte", abl, prep.W) + prep.b[None, None])  # [cls clamp, n_test, probe]
    yt = prep.y[test]
    per_class: dict[str, Any] = {}
    ex_idx, ex_cls = [], []
    for c, lab in enumerate(prep.labels):
        is_c = yt == c
        valid_flip = is_c & (clean_logits[:, c] > 0) & (abl_logits[c, :, c] <= 0)
        n_flips = int(valid_flip.sum())
        flips = np.nonzero(valid_flip if cfg.require_flip else is_c)[0]
        if cfg.max_flips:
            flips = flips[: cfg.max_flips]
        ex_idx += [int(test[i]) for i in flips]
        ex_cls += [c] * len(flips)
        acc = lambda L, j: float(((L[:, j] > 0) == (yt == j)).mean())  # noqa: E731
        others = [j for j in range(n_cls) if j != c]
        per_class[lab] = {
            "n_test": int(is_c.sum()), "n_clean_positive": int((is_c & (clean_logits[:, c] > 0)).sum()),
            "n_valid_flips": n_flips, "n_recovered_on": int(len(flips)),
            "target_probe_acc_clean": acc(clean_logits, c), "target_probe_acc_ablated": acc(abl_logits[c], c),
            "other_probe_acc_clean": float(np.mean([acc(clean_logits, j) for j in others])),
            "other_probe_acc_ablated": float(np.mean([acc(abl_logits[c], j) for j in others])),
            "features": np.asarray(feats[c]).tolist(),
        }
    info = {"n_features": k, "budget": None, "labels": prep.labels, "probe_acc": prep.probe_acc, "per_class": per_class,
            "n_valid_flips": sum(pc["n_valid_flips"] for pc in per_class.values()), "n_recovered_on": len(ex_idx)}
    ex_idx_a, ex_cls_a = np.asarray(ex_idx, np.int64), np.asarray(ex_cls, np.int64)
    seq = prep.tokens.shape[1]
    pool = prep.pool[ex_idx_a]
    delta_slots = np.where(pool, np.arange(seq)[None], -1).astype(np.int32)
    examples = R.Example(
        tokens=jnp.asarray(prep.tokens[ex_idx_a][:, None]), valid=jnp.asarray(prep.valid[ex_idx_a][:, None]),
        delta_slots=jnp.asarray(delta_slots), measure_mask=jnp.asarray(pool),
        target=O.ProbeTarget(w=prep.W[ex_cls_a], b=prep.b[ex_cls_a], mask=jnp.asarray(pool, jnp.float32)),
    )
    clamp = Clamp(prep.sae, feats[ex_cls_a], jnp.zeros((len(ex_idx), k), jnp.float32), mode="zero")
    records = [{"bio": int(i), "label": prep.labels[c]} for i, c in zip(ex_idx, ex_cls, strict=True)]
    return D_.Case({site: clamp}, examples, np.ones(len(ex_idx), bool), records, O.probe_logit, O.probe_success,
                   info, site, problem={"readout": "resid", "readout_site": site},
                   clamp_axes={site: Clamp(None, 0, 0, None, mode="zero")}, used=np.arange(len(ex_idx)))


def methods(prep: Prepared, case: D_.Case, used: np.ndarray) -> list[D_.Method]:
    """Unconstrained and encoder-projected, delta rows at every pooled position."""
    k = case.info["n_features"]
    return [D_.Method(m, m, desc=f"tpp {m} K={k}") for m in ("none", "encoder")]


def summarise(prep: Prepared, recs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """All flips, per class, and the paper's Table 2 aggregation: target means, unweighted over the
    classes with flips."""
    out = {"all_flips": S.mode_summary(recs), "seconds": seconds,
           "per_class": {lab: S.mode_summary([r for r in recs if r["label"] == lab]) for lab in prep.labels}}
    pcs = [s for s in out["per_class"].values() if s["n"]]
    out["target_mean"] = {
        key: float(np.mean([(s[key]["rate"] if "rate" in s[key] else s[key]["mean"]) for s in pcs]))
        for key in ("recovered", "react_frac", "drift_abs", "decode_drift", "zero_reactivation", "drift_rel")
        if all(key in s and (s[key].get("rate", s[key].get("mean")) is not None) for s in pcs)
    }
    return out


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    modes = [m for m in ("none", "encoder") if m in res["modes"]]
    for lab in res["labels"]:
        pc = res["per_class"][lab]
        row: dict[str, Any] = {"target": lab, "valid flips": f"{pc['n_valid_flips']}/{pc['n_test']}",
                               "probe acc clean->ablated": f"{pc['target_probe_acc_clean']:.2f}->{pc['target_probe_acc_ablated']:.2f}"}
        for m in modes:
            s = res["modes"][m]["per_class"][lab]
            if not s["n"]:
                continue
            row[f"rec {m}"] = s["recovered"]["cell"]
            row[f"react {m}"] = s["react_frac"]["mean"]
            row[f"drift {m}"] = s["drift_abs"]["mean"]
            row[f"zero-react {m}"] = s["zero_reactivation"]["rate"]
        rows.append(row)
    mean_row: dict[str, Any] = {"target": "**target mean (ours)**", "valid flips": str(res["n_valid_flips"])}
    paper_row: dict[str, Any] = {"target": "**paper Table 2, all targets**", "valid flips": "--"}
    for m in modes:
        tm = res["modes"][m]["target_mean"]
        mean_row[f"rec {m}"] = tm.get("recovered")
        mean_row[f"react {m}"] = tm.get("react_frac")
        mean_row[f"drift {m}"] = tm.get("drift_abs")
        mean_row[f"zero-react {m}"] = tm.get("zero_reactivation")
        mean_row[f"random dir. {m}"] = (res["modes"][m].get("random_dir") or {}).get("cell", "--")
        paper_row[f"rec {m}"] = PAPER[m]["recovered"]
        paper_row[f"react {m}"] = PAPER[m]["react_frac"]
        paper_row[f"drift {m}"] = PAPER[m]["drift_abs"]
        paper_row[f"zero-react {m}"] = PAPER[m]["zero_reactivation"]
    return rows + [mean_row, paper_row]


def notes(prep: Prepared, res: dict[str, Any]) -> str:
    cfg = prep.cfg
    return (
        f"SAE `{prep.sae_path}` at `{prep.site}`; K={res['n_features']} features per target by {cfg.selection}, "
        f"zero-ablated at every position. Probes: one-vs-rest logistic regression, accuracy {prep.probe_acc}. "
        f"Recovery: Adam lr {cfg.lr}, {cfg.steps} steps, ||delta||_F <= {res['budget']} over all pooled positions. "
        "Per class: recovery with Wilson 95% CI; react = mean reactivated fraction; drift = mean act drift L2 "
        "(abs) over pooled positions; zero-react = recovered with no eligible feature above 0. Target mean = "
        "unweighted over classes (paper Table 2 aggregation). Paper: Gemma-2-2B, Gemma Scope layer 5, SAEBench "
        "TPP latents, 20 targets.\n"
    )


def plot(out: Path, res: dict[str, Any]) -> None:
    modes = [m for m in ("none", "encoder") if m in res["modes"]]
    labs = [lab for lab in res["labels"] if res["per_class"][lab]["n_recovered_on"]]
    report.bar_plot(out / "tpp.png", labs,
                    {f"recovery {m}": [res["modes"][m]["per_class"][lab]["recovered"]["rate"] for lab in labs]
                     for m in modes} | {f"zero-react {m}": [res["modes"][m]["per_class"][lab]["zero_reactivation"]["rate"]
                                                           for lab in labs] for m in modes},
                    ylabel="rate", title=f"TPP recovery per target (K={res['n_features']})")


SETTING = D_.Setting(name=NAME, title="TPP latent-level recovery (paper §5.1, Table 2)", Config=Config,
                     prepare=prepare, case=case, methods=methods, summarise=summarise, table_rows=table_rows,
                     notes=notes, plot=plot, csv_rows=table_rows)


def main(cfg: Config) -> dict[str, Any]:
    return D_.run(SETTING, cfg)
