"""Train residual SAEs for the embedded default (SmolLM2-135M-Instruct) or any model: a thin caller of
``jaxrecover.sae.train.train_sae_on_model``, the function behind ``jaxrecover train-sae``.

Defaults are the shipped TopK release's (``sae_weights/smollm2-135m-instruct-res``: layers 9 and 15,
width 4608, k 64, batch 1024, lr 1e-3, AuxK 288, ~1.2M tokens seen). The corpus is ``--corpus``:
the offline corpus file the release was trained on (``/work/corpus/corpus.jsonl``, built by
``experiments/build_corpus.py``) when it exists, else the text shipped with the package. Each layer is one
``train_sae_on_model`` call writing ``<out-dir>/blocks.L.hook_resid_post/`` (cfg.json, weights, CARD.md,
metrics.json); rerun after an interruption and it resumes.

The shipped cards (attempts table, JumpReLU drift stage) came from ``experiments/train_saes_release.py``.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python experiments/train_saes.py --help``.
"""

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from jaxrecover.sae import train as ts

RELEASE_CORPUS = "/work/corpus/corpus.jsonl"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="folder | FILE.gguf | org/name (default: the embedded default)")
    p.add_argument("--layers", type=int, nargs="+", default=[9, 15])
    p.add_argument("--activation", default="topk", choices=("topk", "jumprelu"))
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1_218_560)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--aux-k", type=int, default=288)
    p.add_argument("--eval-tokens", type=int, default=16_256)
    p.add_argument("--corpus", default=RELEASE_CORPUS if Path(RELEASE_CORPUS).is_file() else ts.SHIPPED_CORPUS)
    p.add_argument("--out-dir", default="sae_weights/smollm2-135m-instruct-res")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str]) -> list[dict[str, Any]]:
    """One ``train_sae_on_model`` call per layer; returns their metrics."""
    from jaxrecover.io import embedded as embedded
    from jaxrecover.io import hf as io_hf
    from jaxrecover.io import resolve as resolve
    from jaxrecover.model.tokenizer import load_tokenizer

    args = parse(argv)
    specs = [ts.SAERun(layer=layer, activation=args.activation, width=args.width, k=args.k, tokens=args.tokens,
                       batch_size=args.batch_size, lr=args.lr, aux_k=args.aux_k, eval_tokens=args.eval_tokens,
                       seed=args.seed) for layer in args.layers]  # every value checked before the model loads
    docs, corpus_name = ts.corpus_texts(args.corpus, seed=args.seed)
    folder = embedded.default_model_dir() if args.model is None else resolve.resolve_model(args.model)
    model, tok = io_hf.load_transformer(folder), load_tokenizer(folder)
    name = "SmolLM2-135M-Instruct" if args.model is None else folder.name
    command = " ".join(["PYTHONPATH=. .venv/bin/python experiments/train_saes.py", *map(shlex.quote, argv)])
    return [ts.train_sae_on_model(model, tok, docs, spec, args.out_dir, model_name=name, model_source=str(folder),
                                  corpus_name=corpus_name, command=command) for spec in specs]


if __name__ == "__main__":
    main(sys.argv[1:])
