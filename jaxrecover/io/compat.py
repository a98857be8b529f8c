"""Is this SAE usable on this model? Pure checks that run BEFORE any model weights load.

They read only the model folder's ``config.json`` (through ``config.from_hf_config``), the presence of
its tokenizer files, and the SAE's config and shapes (an ``SAE`` pytree already loaded, which is cheap):

- ``check_sae``: the SAE's ``d_in`` is the model's ``d_model``; its hook is a residual-stream site
  (``blocks.L.hook_resid_{pre,mid,post}``) with ``L < n_layers``; the model named in the SAE's
  metadata (SAELens ``model_name``) is the model given (a warning only: a base-model SAE on its
  instruct model is common practice);
- ``check_feature_ids``: explicit feature ids are integers in ``[0, d_sae)``;
- ``check_tokenizer``: ``tokenizer.json`` is there, and a chat template when the setting formats
  prompts as a chat (refusal);
- ``gguf_facts``: the same facts of a ``.gguf`` file from its header (the audit checks SAEs against a
  GGUF model before converting it);
- ``check_run``: all of the above for one run (``--model-dir`` + the SAEs it resolved).

Convention (one for the whole command line): bad input raises ``SystemExit`` whose argument is ONE
line naming the file or flag and the numbers; ``jaxrecover``'s CLI prints it and exits with code 2.
Python callers get the same ``SystemExit`` (``str(e)`` is the line).
"""

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrecover.core.sites import Site

EXIT_CODE = 2  # what the CLI exits with for every SystemExit carrying a message (cli.main)

# The embedded default (a sha256-pinned GGUF, see ``embedded``): its facts are fixed, so checking an
# SAE against it needs neither the conversion nor the download that ``default_model_dir`` may do.
EMBEDDED_FACTS = dict(d_model=576, n_layers=30, names=("SmolLM2-135M-Instruct",))

_MSG_NO_CONFIG = "--model-dir {folder}: no config.json there (a model folder holds config.json + *.safetensors + tokenizer.json)."
_MSG_BAD_CONFIG = "--model-dir {folder}: {file} is not readable JSON ({err})."
_MSG_WIDTH = (
    "{flag} {sae}: the SAE reads vectors of width d_in={d_in}, but the model {model} has d_model={d_model}{hint}."
)
_HINT_SHIPPED = (
    "; no --sae was given, so the shipped SmolLM2-135M SAE was picked: pass --sae PATH with an SAE "
    "trained on this model"
)
_MSG_NOT_RESIDUAL = (
    "{flag} {sae}: hook {hook!r} is not a residual-stream site; jaxrecover clamps and recovers at "
    "blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post only ({why})."
)
_WHY = {
    "mlp_out": "MLP-output SAEs read a vector inside the block that the settings never compute",
    "attn_out": "attention-output SAEs read a vector inside the block that the settings never compute",
    "embed": "an embedding-output SAE: pass hook_name='blocks.0.hook_resid_pre' if it reads the scaled embedding",
    "other": "expected blocks.<L>.hook_<point>",
}
_MSG_LAYER = "{flag} {sae}: hook {hook!r} is at layer {layer}, but the model {model} has {n_layers} layers (0..{last})."
_MSG_MODEL_NAME = (
    "jaxrecover: warning: {flag} {sae}: the SAE was trained on {sae_model!r} (its metadata model_name), "
    "but the model given is {model}; results may not mean what they would on the SAE's own model."
)
_MSG_FEATURE = "{flag}: feature id {fid!r} is out of range: the SAE {sae} has d_sae={d_sae} features (ids 0..{last})."
_MSG_NO_TOKENIZER = "--model-dir {folder}: no tokenizer.json there (the setting tokenises its prompts with it)."
_MSG_NO_CHAT = (
    "--model-dir {folder}: no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
    "the {setting} setting formats every prompt as a chat, which a model without a template never saw."
)


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about a model, read without loading its weights."""

    label: str  # how the messages name it (the folder, or the embedded default)
    d_model: int
    n_layers: int
    names: tuple[str, ...]  # names the model goes by (config _name_or_path, folders), for model_name
    folder: Path | None  # None: the embedded default (its tokenizer and template are known good)


def fail(message: str) -> SystemExit:
    """The one exception type for bad input (``raise fail(...)``): one line, exit code 2 via the CLI."""
    return SystemExit(" ".join(message.split()))


def _hf_cache_name(part: str) -> str | None:
    """``models--org--name`` (a Hugging Face cache folder) -> ``name``."""
    m = re.fullmatch(r"models--[^/]+?--(.+)", part)
    return m.group(1) if m else None


def model_facts(model_dir: str | os.PathLike) -> ModelFacts:
    """``ModelFacts`` of ``model_dir`` ('' = the embedded default) from its ``config.json`` only."""
    from jaxrecover.model.config import from_hf_config

    if not str(model_dir):
        check_cache_env()
        return ModelFacts("embedded SmolLM2-135M-Instruct", EMBEDDED_FACTS["d_model"], EMBEDDED_FACTS["n_layers"],
                          EMBEDDED_FACTS["names"], None)
    folder = Path(model_dir)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise fail(_MSG_NO_CONFIG.format(folder=folder))
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
        if not isinstance(hf, dict):
            raise ValueError(f"a JSON object is expected, got {type(hf).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise fail(_MSG_BAD_CONFIG.format(folder=folder, file=cfg_file, err=e)) from None
    try:
        cfg = from_hf_config(hf, where=str(cfg_file))
    except (KeyError, TypeError, ValueError) as e:  # a missing field is a KeyError naming it
        raise fail(f"--model-dir {folder}: {cfg_file}: {type(e).__name__}: {e}") from None
    names = [str(hf.get("_name_or_path", ""))]
    for part in Path(os.path.abspath(folder)).parts:  # as given: a cache snapshot's folders say the name
        names += [part, _hf_cache_name(part) or ""]
    return ModelFacts(str(folder), cfg.d_model, cfg.n_layers, tuple(n for n in names if n), folder)


def gguf_facts(path: str | os.PathLike) -> ModelFacts:
    """``ModelFacts`` of a ``.gguf`` file from its header only (no tensor is read, nothing converted), so
    an SAE is checked against a GGUF model before the one-time conversion. The tokenizer and chat
    template live inside the file (``folder`` None: checked after the conversion)."""
    from jaxrecover.io.gguf import open_gguf

    p = Path(path)
    try:
        reader = open_gguf(p)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        d_model = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
        n_layers = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
        name = bytes(reader.fields["general.name"].parts[-1]).decode() if "general.name" in reader.fields else ""
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise fail(f"model {p}: not a readable GGUF header ({type(e).__name__}: {e}).") from None
    return ModelFacts(str(p), d_model, n_layers, tuple(n for n in (name, p.stem) if n), None)


def check_cache_env() -> None:
    """``$JAXRECOVER_CACHE`` (where the embedded default is converted) names a usable folder, or a
    path one can be created at: a garbage value is one line here, not an OSError at model load."""
    from jaxrecover.io.embedded import CACHE_ENV

    value = os.environ.get(CACHE_ENV)
    if not value:
        return
    p = Path(value).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if probe == p else f"cannot be created ({probe} is not a writable folder)"
        raise fail(f"jaxrecover: {CACHE_ENV}={value!r} {why}; unset it or point it at a folder.")


def _norm_name(name: str) -> str:
    """``google/gemma-2-2b``, ``Gemma-2-2B`` and ``Gemma 2 2b`` (a GGUF's general.name, which
    ``train-sae`` writes as the SAE's model_name) compare equal: the last path part, lower case,
    spaces and underscores as dashes."""
    return re.sub(r"[\s_]+", "-", name.strip().rstrip("/").rsplit("/", 1)[-1].lower())


def sae_model_name(cfg: Mapping[str, Any] | None) -> str:
    """The model an SAE was trained on, as its config says (SAELens 6.x metadata or pre-6 top level)."""
    if not cfg:
        return ""
    meta = cfg.get("metadata")
    name = meta.get("model_name") if isinstance(meta, Mapping) else None
    name = name or cfg.get("model_name")  # pre-6 SAELens: top level
    return name if isinstance(name, str) else ""


def _sae_cfg(path: str) -> dict[str, Any]:
    """The SAE's own config file, if it has one (SAELens / sparsify ``cfg.json``, Gemma Scope 2)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    for name in ("cfg.json", "config.json"):
        try:
            got = json.loads((folder / name).read_text(encoding="utf-8"))
            return got if isinstance(got, dict) else {}
        except (OSError, ValueError):
            continue
    return {}


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the SAEs this package ships (picked when no ``--sae`` is given)."""
    from jaxrecover.io.shipped import sae_weights_roots

    here = Path(os.path.abspath(path))
    roots = [Path(os.path.abspath(r)) for r in sae_weights_roots()]
    return any(root == here or root in here.parents for root in roots)


def sae_site(hook_name: str, sae_label: str, *, flag: str = "--sae") -> Site:
    """The residual ``Site`` of an SAE's hook, or one line naming the SAE and the hook."""
    try:
        return Site.parse(hook_name)
    except ValueError:
        pass
    hook = hook_name or "<none>"
    low = hook.lower()
    kind = ("mlp_out" if "mlp" in low else "attn_out" if "attn" in low or "hook_z" in low
            else "embed" if "embed" in low else "other")
    raise fail(_MSG_NOT_RESIDUAL.format(flag=flag, sae=sae_label, hook=hook, why=_WHY[kind]))


def check_sae(model: ModelFacts, sae: Any, sae_label: str, *, flag: str = "--sae",
              sae_cfg: Mapping[str, Any] | None = None) -> list[str]:
    """Width, site and layer of one SAE against ``model``; returns warnings (model_name)."""
    hint = _HINT_SHIPPED if is_shipped(sae_label) else ""
    if int(sae.d_in) != model.d_model:
        raise fail(_MSG_WIDTH.format(flag=flag, sae=sae_label, d_in=int(sae.d_in), model=model.label,
                                     d_model=model.d_model, hint=hint))
    site = sae_site(sae.hook_name, sae_label, flag=flag)
    if site.layer >= model.n_layers:
        raise fail(_MSG_LAYER.format(flag=flag, sae=sae_label, hook=sae.hook_name, layer=site.layer,
                                     model=model.label, n_layers=model.n_layers, last=model.n_layers - 1))
    trained_on = sae_model_name(_sae_cfg(sae_label) if sae_cfg is None else sae_cfg)
    if trained_on and _norm_name(trained_on) not in {_norm_name(n) for n in model.names}:
        return [_MSG_MODEL_NAME.format(flag=flag, sae=sae_label, sae_model=trained_on, model=model.label)]
    return []


def check_feature_ids(ids: Iterable[Any], d_sae: int, sae_label: str, *, flag: str = "--features") -> list[int]:
    """Explicit feature ids as ints, each in ``[0, d_sae)`` (``True`` or ``2.5`` are not ids)."""
    out = []
    for fid in ids:
        ok = isinstance(fid, (int, np.integer)) and not isinstance(fid, (bool, np.bool_))
        if not ok or not 0 <= int(fid) < d_sae:
            raise fail(_MSG_FEATURE.format(flag=flag, fid=fid if not ok else int(fid), sae=sae_label, d_sae=d_sae,
                                           last=d_sae - 1))
        out.append(int(fid))
    return out


def check_tokenizer(model: ModelFacts, *, chat: bool = False, setting: str = "this") -> None:
    """``tokenizer.json`` present; with ``chat``, a chat template too (the embedded default has both)."""
    if model.folder is None:
        return
    if not (model.folder / "tokenizer.json").is_file():
        raise fail(_MSG_NO_TOKENIZER.format(folder=model.folder))
    if not chat:
        return
    try:
        tcfg = json.loads((model.folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tcfg = {}
    has = isinstance(tcfg, dict) and bool(tcfg.get("chat_template"))
    if not has and not (model.folder / "chat_template.jinja").is_file():
        raise fail(_MSG_NO_CHAT.format(folder=model.folder, setting=setting))


def check_run(model_dir: str | os.PathLike, saes: Mapping[Any, Any] | Sequence[Any], paths: Sequence[Any] = (), *,
              chat: bool = False, setting: str = "this", features: Mapping[Any, Iterable[Any]] | None = None) -> ModelFacts:
    """Every check of one run, before the model loads; warnings go to stderr (one line each).

    Args:
        model_dir: ``--model-dir`` ('' = the embedded default).
        saes: ``{site: SAE}`` or a sequence of SAEs, in the order of ``paths``.
        paths: where each SAE came from (named in the messages; shipped SAEs get a hint).
        chat: the setting chat-formats its prompts (needs a chat template).
        features: optional explicit feature ids per SAE position (``{0: [12, 40]}``).
    """
    model = model_facts(model_dir)
    items = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
    labels = [str(p) for p in paths] if len(paths) == len(items) else [getattr(s, "hook_name", "") or "<sae>" for s in items]
    warnings = []
    for i, (sae, label) in enumerate(zip(items, labels)):
        warnings += check_sae(model, sae, label)
        if features and i in features:
            check_feature_ids(features[i], int(sae.d_sae), label)
    check_tokenizer(model, chat=chat, setting=setting)
    for w in dict.fromkeys(warnings):
        print(w, file=sys.stderr, flush=True)
    return model


__all__ = ["EXIT_CODE", "ModelFacts", "check_cache_env", "check_feature_ids", "check_run", "check_sae",
           "check_tokenizer", "fail", "gguf_facts", "is_shipped", "model_facts", "sae_model_name", "sae_site"]
