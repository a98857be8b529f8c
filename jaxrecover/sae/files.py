"""Every byte of SAE I/O: load four on-disk formats into one ``SAE`` pytree, save SAELens 6.x.

Formats ``load_sae`` detects (a folder, or one file inside it):

==================  ===========================================  ===================================
format              files                                        tensors (as stored)
==================  ===========================================  ===================================
``"saelens"``       ``cfg.json`` + ``sae_weights.safetensors``   ``W_enc [d_in, d_sae]``, ``b_enc``,
                                                                 ``W_dec [d_sae, d_in]``, ``b_dec``,
                                                                 ``threshold`` | ``log_threshold``
                                                                 (jumprelu), gated: ``b_gate``,
                                                                 ``b_mag``, ``r_mag``
``"gemma_scope"``   ``params.npz``                               ``W_enc``, ``W_dec``, ``b_enc``,
                                                                 ``b_dec``, ``threshold``
``"gemma_scope_2"`` ``params.safetensors`` (+ ``config.json``)   lowercase ``w_enc``, ``w_dec``,
                                                                 ``b_enc``, ``b_dec``, ``threshold``
``"sparsify"``      ``cfg.json`` + ``sae.safetensors``           ``encoder.weight [d_sae, d_in]``,
                                                                 ``encoder.bias``,
                                                                 ``W_dec [d_sae, d_in]``, ``b_dec``
==================  ===========================================  ===================================

Both SAELens config generations are read: pre-6.0 (top-level ``hook_name``/``hook_point``,
``activation_fn_str`` + ``activation_fn_kwargs``) and 6.x (``architecture`` + ``metadata``). A
config counts as 6.x when its ``sae_lens_version`` (top level or in ``metadata``) is >= 6, or when
it has a ``metadata`` dict and no top-level hook name — the same rule SAELens' own
``handle_config_defaulting`` applies, plus the second clause for version-less 6.x files.

Semantics that the conversion preserves exactly (checked in ``tests/test_sae_io.py``):

- Gemma Scope (1 and 2) do not subtract ``b_dec`` from the input; sparsify always does (unless it is
  a transcoder, which is refused); SAELens follows ``apply_b_dec_to_input`` (default True, as SAELens).
- SAELens gated SAEs become jumprelu SAEs: the gate ``x@W_enc + b_gate > 0`` is the same event as
  ``x@(W_enc*exp(r_mag)) + b_mag > b_mag - exp(r_mag)*b_gate`` because ``exp(r_mag) > 0``.
- SAELens top-k with ``rescale_acts_by_decoder_norm`` is folded (W_enc, b_enc times the W_dec row
  norms, W_dec divided by them), as SAELens does when it saves an inference SAE.

What this module refuses, with the file and field named (``SAEFormatError``, a ``ValueError``):
normalised inputs (``normalize_activations`` other than None/"none"), ``reshape_activations`` other
than "none" (hook_z SAEs), per-head hooks, fine-tuning scaling factors, transcoders and skip
connections, sparsify ``groupmax``, missing/extra tensors, shape mismatches against the config,
non-float tensors, non-finite values (NaN/inf, checked per tensor as stored and again after any
conversion or dtype cast), and unreadable files. Attention ``hook_z`` SAEs (SAELens ``hook_z`` hooks
or ``reshape_activations="hook_z"``, Gemma Scope ``-att`` releases) and transcoders (SAELens,
sparsify, Gemma Scope ``-transcoders`` and Gemma Scope 2 ``type="transcoder"``) are refused with
one message each. It does not download anything and ignores SAELens' ``sparsity.safetensors``.

Gemma Scope (1) npz files carry no config: the hook is inferred from the path as written (symlinks
are NOT resolved: in the Hugging Face cache ``params.npz`` links into ``blobs/``), and only from the
part below the release folder, ``<release>/layer_N/width_*/average_l0_*/params.npz``, where
``<release>`` (or the cache's ``models--google--<release>``) names the site: ``gemma-scope-*-res``
-> ``blocks.N.hook_resid_post``, ``-mlp`` -> ``blocks.N.hook_mlp_out``; ``-att`` and
``-transcoders`` are refused. Without such a release folder, pass ``hook_name``.
"""

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from jaxrecover.sae.autoencoder import SAE

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_NPZ = "params.npz"
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_CFG = "config.json"

FORMATS = ("saelens", "gemma_scope", "gemma_scope_2", "sparsify")

# The SAELens version written into saved configs: SAELens reads a config as 6.x only when it carries
# a version >= 6 (pre-6 handling would drop `metadata.hook_name`).
SAELENS_FORMAT_VERSION = "6.0.0"

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

_MSG_NO_FORMAT = (
    "{path}: no SAE found. Expected a folder (or a file inside one) holding one of: "
    "cfg.json + sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (EleutherAI sparsify), "
    "params.npz (Gemma Scope), params.safetensors (Gemma Scope 2)."
)
_MSG_UNSUPPORTED = "{file}: unsupported {field}={value!r}: {why}"
_MSG_GS_HOOK = (
    "{file}: cannot infer the hook name from the path: expected "
    "'<release>/layer_<N>/width_*/average_l0_*/params.npz' below a Gemma Scope release folder "
    "(gemma-scope-<model>-res or -mlp; Gemma Scope 2: '<resid_post|mlp_out|attn_out>/layer_<N>_*/'); "
    "pass load_sae(..., hook_name='blocks.<N>.hook_resid_post')."
)
_MSG_NON_FINITE = (
    "{file}: tensor {key!r} holds {count} non-finite value(s) (NaN or inf) out of {size}; "
    "the SAE would silently poison every forward pass. Re-export or re-download the file."
)
_MSG_NON_FINITE_AFTER = (
    "{file}: tensor {key!r} becomes non-finite after {step} ({count} value(s) overflow); "
    "load in a wider dtype (dtype=float32) or fix the stored values."
)
_MSG_HOOK_Z = (
    "{file}: attention hook_z SAEs are not supported ({field}={value!r}): jaxrecover intervenes on "
    "residual-stream sites; a per-head z SAE would need the attention internals."
)
_MSG_TRANSCODER = (
    "{file}: transcoders are not supported ({field}={value!r}): a transcoder maps one site to another, "
    "so it cannot act as a clamp at one site."
)


class SAEFormatError(ValueError):
    """An SAE file that cannot be loaded faithfully. The message names the file and the key/field."""


# ------------------------------------------------------------------------------------------------
# Public API


def detect_format(path: str | os.PathLike) -> str:
    """Which of ``FORMATS`` the folder or file at ``path`` holds (raises ``SAEFormatError`` if none)."""
    return _locate(Path(path))[0]


def load_sae(
    path: str | os.PathLike, *, dtype: Any = None, hook_name: str | None = None
) -> SAE:
    """Load an SAE from any supported format (see module docstring) into an ``SAE`` pytree.

    Args:
        path: the SAE folder, or a weights/config file inside it.
        dtype: cast every array to this dtype; ``None`` keeps the dtype of ``W_enc`` as stored
            (all arrays are brought to that one dtype).
        hook_name: override the hook name. Needed for Gemma Scope files whose path has no
            ``layer_<N>`` component; for the other formats it replaces the configured one.

    Returns:
        The ``SAE``; ``sae.hook_name`` is the TransformerLens/SAELens hook string as configured.

    >>> sae = load_sae("sae_weights/gpt2-small-res-jb/blocks.6.hook_resid_pre")  # doctest: +SKIP
    >>> sae.hook_name, sae.d_in                                                   # doctest: +SKIP
    ('blocks.6.hook_resid_pre', 768)
    """
    return load_sae_with_cfg(path, dtype=dtype, hook_name=hook_name)[0]


def load_sae_with_cfg(
    path: str | os.PathLike, *, dtype: Any = None, hook_name: str | None = None
) -> tuple[SAE, dict[str, Any]]:
    """``load_sae`` that also returns the config as read from disk.

    Returns:
        ``(sae, cfg)``. ``cfg`` is the parsed JSON config unchanged (SAELens ``cfg.json``, sparsify
        ``cfg.json``, Gemma Scope 2 ``config.json``; ``{}`` where the format has none), plus two
        keys of ours: ``"_format"`` (one of ``FORMATS``) and ``"_weights_file"`` (the path read).
    """
    fmt, weights_file, cfg_file = _locate(Path(path))
    loader = {
        "saelens": _load_saelens,
        "gemma_scope": _load_gemma_scope,
        "gemma_scope_2": _load_gemma_scope_2,
        "sparsify": _load_sparsify,
    }[fmt]
    raw_cfg = _read_json(cfg_file) if cfg_file is not None else {}
    arrays, activation, k, apply_b_dec, cfg_hook = loader(weights_file, cfg_file, raw_cfg)
    if not cfg_hook and hook_name is None and fmt in ("gemma_scope", "gemma_scope_2"):
        raise SAEFormatError(_MSG_GS_HOOK.format(file=weights_file))
    target = jnp.dtype(dtype) if dtype is not None else arrays["W_enc"].dtype
    arrays = {name: jnp.asarray(a).astype(target) for name, a in arrays.items()}
    for name, a in arrays.items():  # conversions (exp, folds) and narrowing casts can overflow
        _check_finite(weights_file, name, a, _MSG_NON_FINITE_AFTER, step=f"conversion to {target}")
    sae = SAE(
        W_enc=arrays["W_enc"],
        b_enc=arrays["b_enc"],
        W_dec=arrays["W_dec"],
        b_dec=arrays["b_dec"],
        threshold=arrays.get("threshold"),
        activation=activation,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        hook_name=hook_name if hook_name is not None else cfg_hook,
    )
    return sae, {**raw_cfg, "_format": fmt, "_weights_file": str(weights_file)}


def save_sae(sae: SAE, folder: str | os.PathLike, *, extra_cfg: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` as a SAELens 6.x folder (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    The files are written to a temporary sibling folder which is then renamed into place, so a
    reader never sees a half-written SAE; an existing ``folder`` is replaced whole.

    Args:
        sae: the SAE (relu -> ``"standard"``, jumprelu -> ``"jumprelu"``, topk -> ``"topk"``).
        folder: destination folder (created with its parents).
        extra_cfg: JSON-serialisable entries merged into ``cfg["metadata"]`` (e.g. ``model_name``,
            training statistics). SAELens keeps unknown metadata keys.

    Returns:
        ``Path(folder)``.
    """
    folder = Path(folder)
    architecture = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[sae.activation]
    metadata: dict[str, Any] = {"hook_name": sae.hook_name, "sae_lens_version": SAELENS_FORMAT_VERSION}
    metadata.update(extra_cfg or {})
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": int(sae.d_in),
        "d_sae": int(sae.d_sae),
        "dtype": str(jnp.dtype(sae.W_enc.dtype)),
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if architecture == "topk":
        cfg["k"] = int(sae.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file({name: jnp.asarray(a) for name, a in tensors.items()}, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
        old = None
        if folder.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ------------------------------------------------------------------------------------------------
# Format detection


def _locate(path: Path) -> tuple[str, Path, Path | None]:
    """``(format, weights_file, config_file_or_None)`` for a folder or a file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = path
        if (folder / SAELENS_WEIGHTS).exists():
            return "saelens", folder / SAELENS_WEIGHTS, _require(folder / SAELENS_CFG)
        if (folder / SPARSIFY_WEIGHTS).exists():
            return "sparsify", folder / SPARSIFY_WEIGHTS, _require(folder / SAELENS_CFG)
        if (folder / GEMMA_SCOPE_NPZ).exists():
            return "gemma_scope", folder / GEMMA_SCOPE_NPZ, None
        if (folder / GEMMA_SCOPE_2_WEIGHTS).exists():
            return "gemma_scope_2", folder / GEMMA_SCOPE_2_WEIGHTS, _optional(folder / GEMMA_SCOPE_2_CFG)
        raise SAEFormatError(_MSG_NO_FORMAT.format(path=path))
    folder = path.parent
    if path.name in (SAELENS_CFG, GEMMA_SCOPE_2_CFG):
        return _locate(folder)
    if path.suffix == ".npz":
        return "gemma_scope", path, None
    if path.suffix == ".safetensors":
        keys = set(_safetensors_header(path))
        if "w_enc" in keys:
            return "gemma_scope_2", path, _optional(folder / GEMMA_SCOPE_2_CFG)
        if "encoder.weight" in keys:
            return "sparsify", path, _require(folder / SAELENS_CFG)
        return "saelens", path, _require(folder / SAELENS_CFG)
    raise SAEFormatError(_MSG_NO_FORMAT.format(path=path))


def _require(file: Path) -> Path:
    if not file.exists():
        raise SAEFormatError(f"{file}: missing config file (needed next to the weights)")
    return file


def _optional(file: Path) -> Path | None:
    return file if file.exists() else None


# ------------------------------------------------------------------------------------------------
# Readers


def _read_json(file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{file}: unreadable JSON config ({e})") from e
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{file}: config must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype string, shape)}`` without reading tensor data; corrupt files raise here."""
    try:
        with safe_open(str(file), framework="flax") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception as e:  # the Rust SafetensorError is not importable under a stable name
        raise SAEFormatError(f"{file}: unreadable safetensors file ({e})") from e


def _read_safetensors(file: Path, expected: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()) -> dict:
    """Read exactly the ``expected`` keys (plus any present ``optional`` ones), checking dtype and
    shape; a shape entry of -1 matches any size."""
    header = _safetensors_header(file)
    _check_keys(file, set(header), set(expected), set(optional))
    for key, (dt, _) in header.items():
        if dt not in _FLOAT_DTYPES:
            raise SAEFormatError(f"{file}: tensor {key!r} has non-float dtype {dt}")
    for key, want in expected.items():  # in the loader's order, so W_enc is reported first
        _check_shape(file, key, header[key][1], want)
    try:
        with safe_open(str(file), framework="flax") as f:
            arrays = {key: f.get_tensor(key) for key in header}
    except Exception as e:
        raise SAEFormatError(f"{file}: unreadable safetensors file ({e})") from e
    for key, a in arrays.items():
        _check_finite(file, key, a)
    return arrays


def _check_finite(file: Path, key: str, a: Any, msg: str = _MSG_NON_FINITE, **fmt: Any) -> None:
    """One vectorised pass per tensor; counts only on the (rare) failure path."""
    finite = np.isfinite(np.asarray(a))
    if not finite.all():
        count = int(finite.size - np.count_nonzero(finite))
        raise SAEFormatError(msg.format(file=file, key=key, count=count, size=finite.size, **fmt))


def _check_keys(file: Path, present: set[str], expected: set[str], optional: set[str]) -> None:
    missing = sorted(expected - present)
    extra = sorted(present - expected - optional)
    if missing:
        raise SAEFormatError(f"{file}: missing tensor(s) {missing}; found {sorted(present)}")
    if extra:
        raise SAEFormatError(f"{file}: unexpected tensor(s) {extra} (unsupported SAE variant?)")


def _check_shape(file: Path, key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    ok = len(shape) == len(want) and all(w == -1 or s == w for s, w in zip(shape, want))
    if not ok:
        raise SAEFormatError(f"{file}: tensor {key!r} has shape {list(shape)}, expected {list(want)}")


def _cfg_int(file: Path, cfg: dict[str, Any], field: str, default: Any = None) -> int:
    value = cfg.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SAEFormatError(f"{file}: field {field!r} must be a positive integer, got {value!r}")
    return value


def _unsupported(file: Path, field: str, value: Any, why: str) -> SAEFormatError:
    return SAEFormatError(_MSG_UNSUPPORTED.format(file=file, field=field, value=value, why=why))


# ---- SAELens


def _saelens_generation(cfg: dict[str, Any]) -> int:
    version = cfg.get("sae_lens_version")
    metadata = cfg.get("metadata")
    if not version and isinstance(metadata, dict):
        version = metadata.get("sae_lens_version")
    if version:
        match = re.match(r"\s*v?(\d+)", str(version))
        if match:
            return 6 if int(match.group(1)) >= 6 else 5
    if isinstance(metadata, dict) and "hook_name" not in cfg and "hook_point" not in cfg:
        return 6
    return 5


def _load_saelens(weights: Path, cfg_file: Path | None, cfg: dict[str, Any]):
    assert cfg_file is not None
    generation = _saelens_generation(cfg)
    if generation >= 6:
        metadata = cfg.get("metadata") or {}
        hook_name = metadata.get("hook_name", cfg.get("hook_name", ""))
        head_index = metadata.get("hook_head_index")
        architecture = cfg.get("architecture", "standard")
        k = cfg.get("k")
        reshape = cfg.get("reshape_activations", "none")
        activation_fn = "topk" if architecture == "topk" else "relu"
    else:
        hook_name = cfg.get("hook_name", cfg.get("hook_point", ""))
        head_index = cfg.get("hook_head_index", cfg.get("hook_point_head_index"))
        architecture = cfg.get("architecture", "standard")
        activation_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = kwargs.get("k", cfg.get("k"))
        # SAELens' pre-6 defaulting: hook_z SAEs reshape unless told otherwise
        reshape = cfg.get("reshape_activations", "hook_z" if "hook_z" in str(hook_name) else "none")
        if activation_fn == "topk" and architecture == "standard":
            architecture = "topk"
        elif activation_fn not in ("relu", "topk"):
            raise _unsupported(cfg_file, "activation_fn_str", activation_fn, "only relu and topk are supported")
    if not isinstance(hook_name, str):
        raise SAEFormatError(f"{cfg_file}: field 'hook_name' must be a string, got {hook_name!r}")
    if "hook_z" in hook_name:
        raise SAEFormatError(_MSG_HOOK_Z.format(file=cfg_file, field="hook_name", value=hook_name))
    if reshape == "hook_z":
        raise SAEFormatError(_MSG_HOOK_Z.format(file=cfg_file, field="reshape_activations", value=reshape))
    if "transcoder" in str(architecture):
        raise SAEFormatError(_MSG_TRANSCODER.format(file=cfg_file, field="architecture", value=architecture))

    normalize = cfg.get("normalize_activations", "none")
    if normalize not in (None, "none", False):
        raise _unsupported(
            cfg_file, "normalize_activations", normalize, "inputs would need rescaling at run time; fold it first"
        )
    if reshape not in (None, "none"):
        raise _unsupported(cfg_file, "reshape_activations", reshape, "per-head (hook_z) SAEs are not supported")
    if head_index is not None:
        raise _unsupported(cfg_file, "hook_head_index", head_index, "per-head SAEs are not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise _unsupported(cfg_file, "finetuning_scaling_factor", cfg["finetuning_scaling_factor"], "not supported")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise SAEFormatError(f"{cfg_file}: field 'apply_b_dec_to_input' must be a boolean, got {apply_b_dec!r}")

    d_in = _cfg_int(cfg_file, cfg, "d_in")
    d_sae = _cfg_int(cfg_file, cfg, "d_sae")
    base = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    optional = ("scaling_factor",)  # old SAELens files carry an all-ones one

    if architecture == "standard":
        arrays = _read_safetensors(weights, base, optional)
        activation, k = "relu", 0
    elif architecture == "topk":
        k = _cfg_int(cfg_file, {"k": k}, "k")
        arrays = _read_safetensors(weights, base, optional)
        activation = "topk"
        if cfg.get("rescale_acts_by_decoder_norm", False):
            arrays = _fold_decoder_norm(arrays)
    elif architecture == "jumprelu":
        header = _safetensors_header(weights)
        thr = "log_threshold" if "log_threshold" in header and "threshold" not in header else "threshold"
        arrays = _read_safetensors(weights, {**base, thr: (d_sae,)}, optional)
        if thr == "log_threshold":
            arrays["threshold"] = jnp.exp(arrays.pop("log_threshold"))
        activation, k = "jumprelu", 0
    elif architecture == "gated":
        gated = {"W_enc": (d_in, d_sae), "b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,),
                 "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        arrays = _gated_to_jumprelu(_read_safetensors(weights, gated, optional))
        activation, k = "jumprelu", 0
    else:
        raise _unsupported(
            cfg_file, "architecture", architecture, "supported: standard, jumprelu, topk, gated"
        )
    _drop_unit_scaling_factor(weights, arrays)
    return arrays, activation, k, apply_b_dec, hook_name


def _drop_unit_scaling_factor(file: Path, arrays: dict) -> None:
    if "scaling_factor" not in arrays:
        return
    scale = np.asarray(arrays.pop("scaling_factor"), dtype=np.float32)
    if not np.all(scale == 1.0):
        raise _unsupported(file, "scaling_factor", "not all ones", "fine-tuning scaling factors are not supported")


def _fold_decoder_norm(arrays: dict) -> dict:
    """SAELens ``_fold_norm_topk``: identical top-k choice and output with unit-norm decoder rows."""
    norm = jnp.linalg.norm(arrays["W_dec"].astype(jnp.float32), axis=-1).astype(arrays["W_dec"].dtype)
    return {**arrays, "W_enc": arrays["W_enc"] * norm[None, :], "b_enc": arrays["b_enc"] * norm,
            "W_dec": arrays["W_dec"] / norm[:, None]}


def _gated_to_jumprelu(a: dict) -> dict:
    """Gated SAE -> the equal jumprelu SAE (see module docstring)."""
    scale = jnp.exp(a["r_mag"])
    out = {"W_enc": a["W_enc"] * scale[None, :], "b_enc": a["b_mag"], "W_dec": a["W_dec"], "b_dec": a["b_dec"],
           "threshold": a["b_mag"] - scale * a["b_gate"]}
    if "scaling_factor" in a:
        out["scaling_factor"] = a["scaling_factor"]
    return out


# ---- Gemma Scope (1): params.npz


# A Gemma Scope (1) release folder as published (``gemma-scope-2b-pt-res``) or as the Hugging Face
# cache names it (``models--google--gemma-scope-2b-pt-res``); the suffix says what the SAEs read.
_GS_RELEASE = re.compile(r"(?:^|--)gemma-scope-[\w.]+?-(?:pt|it)-(res|mlp|att|transcoders)\b", re.IGNORECASE)
_GS_LAYER = re.compile(r"layer_(\d+)")
_GS_HOOKS = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out"}


def logical_cwd() -> str:
    """The current folder as the user reached it: ``$PWD`` when it names the same folder as
    ``os.getcwd()`` (which the kernel reports with every symlink resolved), as ``pwd -L`` does. Inside
    a symlinked snapshot folder the resolved path loses the release and ``layer_N`` names."""
    here, pwd = os.getcwd(), os.environ.get("PWD", "")
    try:
        if pwd and os.path.isabs(pwd) and pwd != here and os.path.samefile(pwd, here):
            return pwd
    except OSError:  # a stale $PWD (folder removed): the kernel's answer
        pass
    return here


def _lexical_parts(file: Path) -> tuple[str, ...]:
    """The absolute path's components as written: ``..`` folded, symlinks NOT followed (the Hugging
    Face cache links ``params.npz`` into ``blobs/``, which would lose the ``layer_N`` folder); a
    relative path is joined to the logical current folder (``logical_cwd``), not the resolved one."""
    return Path(os.path.normpath(os.path.join(logical_cwd(), os.fspath(file)))).parts


def _gemma_scope_release(file: Path) -> tuple[str, tuple[str, ...]] | None:
    """``(kind, parts below the release folder)`` for the nearest release folder above ``file``."""
    parts = _lexical_parts(file)
    for i in range(len(parts) - 2, -1, -1):
        found = _GS_RELEASE.search(parts[i])
        if found:
            return found.group(1).lower(), parts[i + 1 : -1]
    return None


def _gemma_scope_hook(file: Path) -> str:
    """``<release>/layer_12/width_16k/average_l0_82/params.npz`` -> ``blocks.12.hook_resid_post``
    (``-mlp`` release: ``hook_mlp_out``). Only the path below the release folder counts, so a
    ``layer_7`` higher up (``runs_layer_7/gemma-scope-2b-pt-mlp/layer_3/...``) is ignored. Returns ""
    when there is no release folder or not exactly one ``layer_<N>`` folder below it; raises for
    attention (hook_z) and transcoder releases."""
    release = _gemma_scope_release(file)
    if release is None:
        return ""
    kind, below = release
    if kind == "att":
        raise SAEFormatError(_MSG_HOOK_Z.format(file=file, field="release", value="gemma-scope-*-att"))
    if kind == "transcoders":
        raise SAEFormatError(_MSG_TRANSCODER.format(file=file, field="release", value="gemma-scope-*-transcoders"))
    layers = [int(m.group(1)) for part in below if (m := _GS_LAYER.fullmatch(part))]
    return _GS_HOOKS[kind].format(layer=layers[0]) if len(layers) == 1 else ""


def _load_gemma_scope(weights: Path, cfg_file: Path | None, cfg: dict[str, Any]):
    hook = _gemma_scope_hook(weights)  # before reading: refused releases fail fast
    try:
        with np.load(weights, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SAEFormatError(f"{weights}: unreadable npz file ({e})") from e
    arrays = _jumprelu_arrays(weights, arrays, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    for key, a in arrays.items():  # npz names are ours (W_enc, ...): the stored names
        _check_finite(weights, key, a)
    return arrays, "jumprelu", 0, False, hook


def _jumprelu_arrays(file: Path, arrays: dict, names: tuple[str, str, str, str, str]) -> dict:
    """Check a Gemma Scope key set (``names`` = W_enc, b_enc, W_dec, b_dec, threshold as stored)."""
    _check_keys(file, set(arrays), set(names), set())
    for key, a in arrays.items():
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise SAEFormatError(f"{file}: tensor {key!r} has non-float dtype {a.dtype}")
    w_enc, b_enc, w_dec, b_dec, thr = names
    if arrays[w_enc].ndim != 2:
        raise SAEFormatError(f"{file}: tensor {w_enc!r} has shape {list(arrays[w_enc].shape)}, expected [d_in, d_sae]")
    d_in, d_sae = arrays[w_enc].shape
    want = {w_enc: (d_in, d_sae), b_enc: (d_sae,), w_dec: (d_sae, d_in), b_dec: (d_in,), thr: (d_sae,)}
    for key, shape in want.items():
        _check_shape(file, key, tuple(arrays[key].shape), shape)
    return {"W_enc": arrays[w_enc], "b_enc": arrays[b_enc], "W_dec": arrays[w_dec], "b_dec": arrays[b_dec],
            "threshold": arrays[thr]}


# ---- Gemma Scope 2: params.safetensors (+ config.json)


def _load_gemma_scope_2(weights: Path, cfg_file: Path | None, cfg: dict[str, Any]):
    where = cfg_file if cfg_file is not None else weights
    kind = cfg.get("type", "sae")
    if kind == "transcoder":
        raise SAEFormatError(_MSG_TRANSCODER.format(file=where, field="type", value=kind))
    if kind != "sae":
        raise _unsupported(where, "type", kind, "only SAEs (not transcoders or crosscoders) are supported")
    if cfg.get("affine_connection"):
        raise _unsupported(where, "affine_connection", cfg["affine_connection"], "skip connections are not supported")
    architecture = cfg.get("architecture", "jump_relu")
    if architecture not in ("jump_relu", "jumprelu"):
        raise _unsupported(where, "architecture", architecture, "Gemma Scope 2 SAEs are jump_relu")
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if hook_out is not None and hook_out != hook_in:
        raise SAEFormatError(_MSG_TRANSCODER.format(file=where, field="hf_hook_point_out", value=hook_out))

    header = _safetensors_header(weights)
    for key, (dt, _) in header.items():
        if dt not in _FLOAT_DTYPES:
            raise SAEFormatError(f"{weights}: tensor {key!r} has non-float dtype {dt}")
    _check_keys(weights, set(header), {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}, set())
    arrays = _read_safetensors(weights, {key: tuple(-1 for _ in shape) for key, (_, shape) in header.items()})
    arrays = _jumprelu_arrays(weights, arrays, ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"))
    width = cfg.get("width")
    if width is not None and width != arrays["W_enc"].shape[1]:
        raise SAEFormatError(f"{where}: field 'width'={width} but tensor 'w_enc' has {arrays['W_enc'].shape[1]} latents")
    return arrays, "jumprelu", 0, False, _gemma_scope_2_hook(weights, hook_in)


_GS2_SITES = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
_GS2_LAYER = re.compile(r"layer_(\d+)(?:_|$)")


def _gemma_scope_2_hook(file: Path, hf_hook: Any) -> str:
    """``model.layers.12.output`` (the residual after block 12) -> ``blocks.12.hook_resid_post``;
    other HF hook points are kept as-is. Without a config, the two folders above the file say it:
    ``<resid_post|mlp_out|attn_out>[_all]/layer_<N>_width_*_l0_*/params.safetensors`` (as written,
    symlinks not followed); transcoder folders are refused; anything else returns ""."""
    if isinstance(hf_hook, str):
        match = re.fullmatch(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.output", hf_hook)
        return f"blocks.{match.group(1)}.hook_resid_post" if match else hf_hook
    parts = _lexical_parts(file)
    if len(parts) < 3:
        return ""
    site_dir, layer_dir = parts[-3].lower(), parts[-2]
    if "transcoder" in site_dir:
        raise SAEFormatError(_MSG_TRANSCODER.format(file=file, field="folder", value=parts[-3]))
    layer = _GS2_LAYER.match(layer_dir)
    point = next((p for prefix, p in _GS2_SITES.items() if site_dir.startswith(prefix)), None)
    return f"blocks.{int(layer.group(1))}.{point}" if layer and point else ""


# ---- EleutherAI sparsify: cfg.json + sae.safetensors


def _load_sparsify(weights: Path, cfg_file: Path | None, cfg: dict[str, Any]):
    assert cfg_file is not None
    if cfg.get("transcode"):
        raise SAEFormatError(_MSG_TRANSCODER.format(file=cfg_file, field="transcode", value=cfg["transcode"]))
    if cfg.get("skip_connection"):
        raise _unsupported(cfg_file, "skip_connection", cfg["skip_connection"], "W_skip is not supported")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise _unsupported(cfg_file, "activation", activation, "only topk is supported")
    d_in = _cfg_int(cfg_file, cfg, "d_in")
    k = _cfg_int(cfg_file, cfg, "k")
    d_sae = cfg.get("num_latents") or d_in * _cfg_int(cfg_file, cfg, "expansion_factor", 32)
    d_sae = _cfg_int(cfg_file, {"num_latents": d_sae}, "num_latents")
    header = _safetensors_header(weights)
    if "W_skip" in header:
        raise _unsupported(weights, "W_skip", "present", "skip connections are not supported (cfg skip_connection)")
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    a = _read_safetensors(weights, expected)
    # nn.Linear stores [out, in]: the one transpose this format needs. W_dec is already [d_sae, d_in].
    arrays = {"W_enc": a["encoder.weight"].T, "b_enc": a["encoder.bias"], "W_dec": a["W_dec"], "b_dec": a["b_dec"]}
    hook_name = cfg.get("hook_name", "") or _sparsify_hook(weights.parent)
    return arrays, "topk", k, True, hook_name


def _sparsify_hook(folder: Path) -> str:
    """sparsify names folders by module (``layers.6``, ``embed_tokens``): the residual after block 6
    is ``blocks.6.hook_resid_post`` (what SAELens' sparsify loader assumes too); else keep the name."""
    name = _lexical_parts(folder)[-1]  # the folder as written: '.' inside layers.6 is layers.6
    match = re.fullmatch(r"(?:.*\.)?layers[._](\d+)", name)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else name

