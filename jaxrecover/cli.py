"""``jaxrecover`` command line: run the paper's experiments on the embedded default or your own
model + SAE, and inspect checkpoints.

Experiments are modules of ``jaxrecover.paper`` (installed with the package). Each defines a frozen
``Config`` dataclass (every field is a CLI option) and ``main(cfg) -> dict``.
"""

import argparse
import dataclasses
import os
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


def cmd_run(argv: list[str]) -> int:
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
    start_distributed(_LAUNCH_OPTIONS)  # after the values are checked, before the setting touches a device
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
    from jaxrecover import io_hf

    if args.model_dir or not args.sae:
        from jaxrecover import embedded

        folder = Path(args.model_dir) if args.model_dir else embedded.default_model_dir()
        model = io_hf.load_transformer(folder)
        print(f"model: {folder}\n  {model.cfg}")
    if args.sae:
        from jaxrecover.sae_io import load_sae

        sae = load_sae(args.sae)
        print(f"sae: {args.sae}\n  hook={sae.hook_name} activation={sae.activation} k={sae.k} d_in={sae.d_in} d_sae={sae.d_sae}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    from jaxrecover import inspect

    return inspect.main(argv)


COMMANDS = {"run": cmd_run, "list": cmd_list, "info": cmd_info, "inspect": cmd_inspect}

_LAUNCH_OPTIONS: dict[str, str] = {}  # what main took out of argv, for cmd_run

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
    from jaxrecover import distributed  # noqa: PLC0415

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
    if per_device:
        from jaxrecover import runner  # noqa: PLC0415

        runner.PER_DEVICE_BATCH = per_device
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
        print(__doc__.strip() + "\n\ncommands: run NAME [options] | list | info | inspect\n\n" + _EPILOG)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if not no_cache:  # before the first compile: a second run loads its XLA programs from disk
        from jaxrecover import compile_cache  # noqa: PLC0415

        compile_cache.enable()
    _LAUNCH_OPTIONS.clear()
    _LAUNCH_OPTIONS.update(launch)
    try:
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
