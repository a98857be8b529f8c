"""Look at pytrees: a model, its clamps and a recovery result rendered with treescope (penzai's
interactive pretty-printer) into one self-contained HTML page, or as plain text.

- ``save_html(path, model=..., clamps=..., result=...)``: one section per keyword, each an
  interactive foldable rendering (array leaves shown as shape, dtype, statistics and a heat map)
  followed by a plain-text rendering, so the page is searchable and diffable.
- ``main(argv)``: the ``jaxrecover inspect`` command, ``--model-dir DIR --sae PATH [--features 1,2,3]
  [--result FILE.npz] [--out FILE.html]``: the model (default: the embedded one), the zero-ablation
  clamp of ``--features`` at the SAE's site, and optionally saved arrays, in one page.
"""

import argparse
import html
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import treescope  # installed with penzai; penzai's ``pz.show`` uses the same renderer

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} pre{{font-size:12px;white-space:pre-wrap}}</style>
</head><body>
<h1>{title}</h1>
{sections}
</body></html>
"""

_SECTION = """<section id="{name}">
<h2>{name}</h2>
{summary}
{interactive}
<details><summary>plain text</summary><pre>{text}</pre></details>
</section>
"""


def to_text(tree: Any) -> str:
    """A compact text rendering (array leaves summarised by shape, dtype and statistics)."""
    return treescope.render_to_text(tree)


def _renderable(obj: Any) -> Any:
    """Mappings keyed by non-strings (``{Site: Clamp}``) are shown keyed by their string form
    (``blocks.9.hook_resid_post``), the name a reader searches for."""
    if isinstance(obj, Mapping) and not all(isinstance(k, str) for k in obj):
        return {str(k): v for k, v in obj.items()}
    return obj


def _clamp_lines(obj: Any) -> list[str]:
    """One line per clamp found in ``obj`` (site, SAE hook, features, values, mode): the facts a reader
    wants before unfolding anything."""
    from penzai import pz

    from jaxrecover.sae.clamp import Clamp

    lines = []
    for c in pz.select(obj).at_instances_of(Clamp).get_sequence():
        hook = getattr(c.sae, "hook_name", "") or "(no hook name)"
        feats = np.asarray(c.features).tolist() if c.features is not None else None
        vals = np.asarray(c.values).tolist() if c.values is not None and c.mode != "zero" else None
        lines.append(f"Clamp at {hook}: mode {c.mode!r}, features {feats}" + (f", values {vals}" if vals is not None else ""))
    return lines


def _section(name: str, obj: Any) -> str:
    obj = _renderable(obj)
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        interactive = treescope.render_to_html(obj, roundtrip_mode=False)
    lines = _clamp_lines(obj)
    summary = "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>" if lines else ""
    return _SECTION.format(name=html.escape(name), summary=summary, interactive=interactive,
                           text=html.escape(to_text(obj)))


def save_html(path: str | Path, *, title: str = "jaxrecover inspect", **objects: Any) -> Path:
    """Write one self-contained HTML page with a section per keyword argument.

    Args:
        path: the ``.html`` file to write (parent folders are created).
        title: the page title.
        **objects: name -> pytree, e.g. ``model=model, clamps={site: clamp}, result=result``. Any
            pytree renders; clamps found anywhere are also listed as one line each at the top of
            their section.

    Returns:
        ``path``. Open it in a browser; it needs no network.

    >>> save_html("out/look.html", model=model, clamps={site: clamp}, result=res)  # doctest: +SKIP
    """
    if not objects:
        raise ValueError("save_html: nothing to render; pass e.g. model=..., clamps=..., result=....")
    page = _PAGE.format(title=html.escape(title), sections="\n".join(_section(k, v) for k, v in objects.items()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- jaxrecover inspect


def _parse_features(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise SystemExit(f"jaxrecover inspect: --features must be comma-separated integers, got {text!r}.") from None


def _load_result(path: str) -> dict[str, Any]:
    """Arrays saved with ``np.savez`` (e.g. a recovery result's fields), as a name -> array dict."""
    p = Path(path)
    if p.suffix != ".npz":
        raise SystemExit(f"jaxrecover inspect: --result must be an .npz file of arrays, got {p}.")
    with np.load(p, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxrecover inspect",
        description="Write an HTML page (treescope) of a model, the zero-ablation clamp of SAE features "
                    "at the SAE's site, and optionally saved result arrays.",
    )
    p.add_argument("--model-dir", default=None,
                   help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct).")
    p.add_argument("--sae", required=True, help="SAE folder or file (any format load_sae reads).")
    p.add_argument("--features", default="", help="comma-separated SAE feature ids to clamp to 0, e.g. 12,345.")
    p.add_argument("--result", default=None, help="optional .npz of arrays to show (e.g. a recovery result).")
    p.add_argument("--out", default="inspect.html", help="the HTML file to write (default: inspect.html).")
    return p


def main(argv: list[str]) -> int:
    """``jaxrecover inspect``: returns the exit status (0 when the page was written)."""
    from jaxrecover.io.embedded import default_model_dir
    from jaxrecover.sae.clamp import Clamp, check_clamps
    from jaxrecover.io.hf import load_transformer
    from jaxrecover.sae.files import load_sae
    from jaxrecover.core.sites import Site

    from jaxrecover.io import compat as compat

    args = build_parser().parse_args(argv)
    sae = load_sae(args.sae)
    if not sae.hook_name:
        raise SystemExit(f"jaxrecover inspect: the SAE at {args.sae} names no hook; cannot place its clamp.")
    # width, site, layer and feature ids from config.json and the SAE, before the model loads
    facts = compat.model_facts(args.model_dir or "")
    for warning in compat.check_sae(facts, sae, str(args.sae)):
        print(warning, file=sys.stderr)
    site = Site.parse(sae.hook_name)
    features = compat.check_feature_ids(_parse_features(args.features) or [], sae.d_sae, str(args.sae))
    model = load_transformer(args.model_dir if args.model_dir is not None else default_model_dir())
    objects: dict[str, Any] = {"model": model}
    if features:
        import jax.numpy as jnp

        clamp = Clamp(sae, jnp.asarray(features, jnp.int32), jnp.zeros(len(features), sae.W_dec.dtype))
        clamps = {site: clamp}
        check_clamps(model, clamps)  # the SAE fits this model at that site
        objects["clamps"] = clamps
    else:
        objects["sae"] = sae
    if args.result is not None:
        objects["result"] = _load_result(args.result)
    out = save_html(args.out, title=f"jaxrecover inspect: {model.cfg.arch} + {sae.hook_name}", **objects)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {', '.join(objects)}")
    return 0
