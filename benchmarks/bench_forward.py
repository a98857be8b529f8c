"""Forward-pass throughput: ``jit(vmap(forward))`` on a batch, compile time apart from steady state.

Default model: a random float32 Llama with SmolLM2-135M's shapes (d_model 576, 30 layers, 9 heads,
3 kv heads, d_head 64, d_mlp 1536, vocab 49152, tied embeddings); ``--model-dir`` times a real
Hugging Face folder instead (loaded with ``load_transformer``). Prints one JSON line.

    .venv/bin/python benchmarks/bench_forward.py --batch 8 --seq 64 --repeats 5
    .venv/bin/python benchmarks/bench_forward.py --model-dir ~/.cache/jaxrecover/smollm2-135m-instruct
"""

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_forward.py` as well as `python -m benchmarks.bench_forward`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import _timing  # noqa: E402
from jaxrecover.io.hf import load_transformer  # noqa: E402
from jaxrecover.testing import random_transformer, tiny_config  # noqa: E402
from jaxrecover.model.transformer import forward  # noqa: E402

SMOLLM2_135M = dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_mlp=1536, d_vocab=49152,
                    n_ctx=8192, norm_eps=1e-5, rope_theta=100000.0, tied_embeddings=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--model-dir", default=None, help="time a real HF folder instead of the random 135M-shaped model")
    args = p.parse_args(argv)

    if args.model_dir:
        model, name = load_transformer(args.model_dir, dtype=args.dtype), str(args.model_dir)
    else:
        model = random_transformer(jax.random.key(0), tiny_config("llama", dtype=args.dtype, **SMOLLM2_135M))
        name = "random-smollm2-135m-shape"
    cfg = model.cfg
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.d_vocab)
    run = jax.jit(jax.vmap(forward, in_axes=(None, 0)))
    compile_s, _ = _timing.time_compile(run, model, tokens)
    steady = _timing.time_steady(run, model, tokens, repeats=args.repeats)
    n_params = sum(x.size for x in jax.tree.leaves(model))
    # 2 FLOPs per multiply-add per parameter per token (matmuls; attention scores are small at this seq).
    result = {
        "bench": "forward",
        "model": name,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "n_params": int(n_params),
        "compile_s": round(compile_s - steady.median, 4),
        "steady_median_s": round(steady.median, 5),
        "steady_min_s": round(steady.min, 5),
        "tokens_per_s": round(args.batch * args.seq / steady.median, 1),
        "approx_gflops_per_s": round(2 * n_params * args.batch * args.seq / steady.median / 1e9, 2),
        "device": str(jax.devices()[0].device_kind),
        "n_devices": len(jax.devices()),
        "platform": platform.machine(),
        "jax": jax.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
