"""Name a model or an SAE the way a user has it on disk, get back a local folder. Never downloads.

Contract:
- ``resolve_model(spec)`` -> a Hugging Face style model folder (``config.json`` + safetensors). ``spec`` is
  - a folder: returned as it is;
  - a ``.gguf`` file: converted once (``jaxrecover.io.gguf``) into ``<cache>/converted/<stem>-<key>``,
    ``<cache>`` = ``$JAXRECOVER_CACHE`` or ``~/.cache/jaxrecover``, ``<key>`` from the file's absolute path,
    size and mtime; later calls only check the folder's marker;
  - a Hugging Face repo id ``org/name`` (optionally ``org/name@rev``, a branch/tag under ``refs/`` or a
    commit hash): the snapshot in the local HF cache (``hf_hub_dirs``: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), layout
    ``models--org--name/refs/main`` -> ``snapshots/<rev>/`` whose files link into ``blobs/``.
- ``resolve_sae(path)`` / ``resolve_sae(release=, sae_id=)``: a folder or file as it is, or a SAELens-style
  release + SAE id looked up in the registry shipped as ``jaxrecover/data/sae_registry.json`` (release ->
  repo id + the SAE's folder inside the repo) and then found in the local HF cache like a model.
- Snapshot paths are returned unresolved (symlinks kept): the Gemma Scope loader reads the layer from the
  path, which the ``blobs/<hash>`` target would lose.
- Everything missing is ONE line (``ResolveError``, a ``ValueError``) naming every place looked at; a
  release not in the registry names the nearest known releases. The CLI prints it and exits 2.

Not here: loading (``io_hf``, ``sae_io``), compatibility of an SAE with a model (``compat``).
"""

import dataclasses
import difflib
import hashlib
import json
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

REGISTRY_FILE = "sae_registry.json"
_REPO_ID = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_MSG_NO_MODEL = "model {spec!r} not found: {looked} (nothing is downloaded; put the folder or file there, or pass a path)."
_MSG_NOT_SPEC = "model {spec!r}: not a folder, a .gguf file, or a Hugging Face repo id org/name[@rev]."
_MSG_NO_SNAPSHOT = "{repo}@{rev}: not in the local Hugging Face cache: {looked} (nothing is downloaded)."
_MSG_NO_CONFIG = "{folder}: no config.json (not a Hugging Face model folder)."
_MSG_NO_RELEASE = "SAE release {release!r} is not in jaxrecover's registry ({file}); nearest known: {near}."
_MSG_BAD_SAE_ID = "SAE id {sae_id!r} is not in release {release!r}; {hint}."
_MSG_NO_SAE_FILE = "SAE {release}/{sae_id} ({repo}: {path}) not in the local Hugging Face cache: {looked} (nothing is downloaded)."
_MSG_NO_SAE_PATH = "SAE {spec!r} not found: no such file or folder ({where})."


class ResolveError(ValueError):
    """A model or SAE that is not where it was named; the message lists where we looked."""


# ----------------------------------------------------------------------------- the local Hugging Face cache


def hf_hub_dirs() -> list[Path]:
    """Hub cache folders in the order Hugging Face itself uses: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return [(Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"]


def parse_repo_id(spec: str) -> tuple[str, str] | None:
    """``("org/name", rev)`` for ``org/name`` or ``org/name@rev`` (rev defaults to ``main``), else None."""
    m = _REPO_ID.match(spec)
    if m is None or spec.startswith((".", "/", "~")):
        return None
    return f"{m['org']}/{m['name']}", m["rev"] or "main"


def _snapshot_candidates(repo_dir: Path, rev: str) -> list[Path]:
    """Where ``rev`` of a cached repo could be: ``refs/<rev>`` names a commit folder, or ``rev`` is one."""
    out = []
    ref = repo_dir / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
        if commit:
            out.append(repo_dir / "snapshots" / commit)
    out.append(repo_dir / "snapshots" / rev)  # a commit hash given directly
    return out


def find_snapshot(repo_id: str, rev: str = "main", *, kind: str = "model") -> tuple[Path | None, list[str]]:
    """``(snapshot folder or None, places looked at)`` for ``repo_id@rev`` in every hub cache folder."""
    looked = []
    for hub in hf_hub_dirs():
        repo_dir = hub / f"{kind}s--{repo_id.replace('/', '--')}"
        for snap in _snapshot_candidates(repo_dir, rev):
            if snap.is_dir():
                return snap, looked
        looked.append(f"{repo_dir} (absent)" if not repo_dir.exists()
                      else f"{repo_dir} (no refs/{rev}, no snapshots/{rev})")
    return None, looked


def snapshot_dir(repo_id: str, rev: str = "main") -> Path:
    """The cached snapshot of model repo ``repo_id@rev``; ``ResolveError`` naming every place otherwise."""
    snap, looked = find_snapshot(repo_id, rev)
    if snap is None:
        raise ResolveError(_MSG_NO_SNAPSHOT.format(repo=repo_id, rev=rev, looked="; ".join(looked)))
    return snap


# ----------------------------------------------------------------------------- models


def gguf_cache_dir(gguf: Path, cache_dir: PathLike | None = None) -> Path:
    """``<cache>/converted/<stem>-<key>``: the key is a hash of the absolute path, size and mtime, so a
    changed file is converted again and an unchanged one is not even re-hashed."""
    from jaxrecover.io.embedded import cache_root

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "converted" / f"{gguf.stem}-{key}"


def converted_gguf(gguf: PathLike, cache_dir: PathLike | None = None, *, say: Any = None) -> Path:
    """The converted folder of ``gguf`` in the cache, converting it first if needed."""
    from jaxrecover.io.gguf import SOURCE_MARKER, gguf_to_hf_folder

    gguf = Path(gguf)
    folder = gguf_cache_dir(gguf, cache_dir)
    if (folder / SOURCE_MARKER).is_file() and (folder / "config.json").is_file():
        return folder
    if say is not None:
        say(f"converting {gguf} once into {folder}")
    return gguf_to_hf_folder(gguf, folder, overwrite=folder.exists())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model spec names, before anything is converted: ``kind`` is folder | gguf | hub."""

    spec: str
    kind: str
    path: Path  # the folder, the .gguf file, or the hub snapshot


def classify_model(spec: str) -> ModelSpec:
    """Which of folder / .gguf / repo id ``spec`` is, and where it is; ``ResolveError`` if none.

    A path that exists wins over a repo id (``models/tiny`` is a folder if there is one)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ResolveError(_MSG_NO_CONFIG.format(folder=p))
        return ModelSpec(spec, "folder", p)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ResolveError(_MSG_NOT_SPEC.format(spec=spec))
        return ModelSpec(spec, "gguf", p)
    repo = parse_repo_id(spec)
    if repo is None or spec.endswith(".gguf"):
        raise ResolveError(_MSG_NO_MODEL.format(spec=spec, looked=f"no file or folder {p.absolute()}"))
    snap, looked = find_snapshot(*repo)
    if snap is None:
        where = [f"no folder {p.absolute()}", *looked]
        raise ResolveError(_MSG_NO_MODEL.format(spec=spec, looked="; ".join(where)))
    if not (snap / "config.json").exists():
        raise ResolveError(_MSG_NO_CONFIG.format(folder=snap))
    return ModelSpec(spec, "hub", snap)


def resolve_model(spec: str | PathLike, *, cache_dir: PathLike | None = None, say: Any = None) -> Path:
    """A local Hugging Face model folder for ``spec`` (folder, ``.gguf`` file, ``org/name[@rev]``)."""
    named = classify_model(str(spec))
    if named.kind == "gguf":
        return converted_gguf(named.path, cache_dir, say=say)
    return named.path


def peek_n_layers(spec: ModelSpec) -> int | None:
    """The number of blocks, read without loading weights (config.json, or the GGUF header)."""
    try:
        if spec.kind == "gguf":
            from jaxrecover.io.gguf import open_gguf

            reader = open_gguf(spec.path)
            arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
            return int(reader.fields[f"{arch}.block_count"].parts[-1][0])
        cfg = json.loads((spec.path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        return int(cfg.get("num_hidden_layers") or cfg.get("n_layer"))
    except (KeyError, ValueError, TypeError, OSError):
        return None


# ----------------------------------------------------------------------------- SAEs


@lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Any]]:
    """The shipped release registry: release name -> {repo_id, model, format, path | paths, ...}."""
    text = resources.files("jaxrecover.data").joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
    return json.loads(text)["releases"]


def nearest_releases(release: str, n: int = 4) -> list[str]:
    """Registry names closest to ``release`` (fuzzy match, then shared prefix), at most ``n``."""
    names = list(registry())
    near = difflib.get_close_matches(release, names, n=n, cutoff=0.5)
    for name in names:
        if len(near) < n and name not in near and name.split("-")[0] == release.split("-")[0]:
            near.append(name)
    return near or names[:n]


def sae_path_in_release(release: str, sae_id: str) -> tuple[str, str]:
    """``(repo_id, folder inside the repo)`` of ``sae_id`` in ``release``; ``ResolveError`` otherwise."""
    entries = registry()
    if release not in entries:
        raise ResolveError(_MSG_NO_RELEASE.format(release=release, file=f"jaxrecover/data/{REGISTRY_FILE}",
                                                  near=", ".join(nearest_releases(release))))
    entry = entries[release]
    if "paths" in entry:
        if sae_id not in entry["paths"]:
            ids = list(entry["paths"])
            near = difflib.get_close_matches(sae_id, ids, n=3, cutoff=0.3) or ids[:3]
            raise ResolveError(_MSG_BAD_SAE_ID.format(sae_id=sae_id, release=release,
                                                      hint="nearest ids: " + ", ".join(near)))
        return entry["repo_id"], entry["paths"][sae_id]
    m = re.match(entry["id_pattern"], sae_id)
    if m is None:
        raise ResolveError(_MSG_BAD_SAE_ID.format(sae_id=sae_id, release=release,
                                                  hint=f"ids look like {entry['example_id']!r}"))
    return entry["repo_id"], entry["path"].format(sae_id=sae_id, **m.groupdict())


def resolve_sae(path: PathLike | None = None, *, release: str | None = None, sae_id: str | None = None,
                rev: str = "main") -> Path:
    """The SAE's local folder or file: ``path`` as it is, or ``release`` + ``sae_id`` in the HF cache."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise ResolveError(_MSG_NO_SAE_PATH.format(spec=str(path), where=p.absolute()))
        return p
    if not release or not sae_id:
        raise ResolveError("name an SAE by a path, or by both release and sae_id.")
    repo_id, inner = sae_path_in_release(release, sae_id)
    snap, looked = find_snapshot(repo_id, rev)
    if snap is not None:
        if (snap / inner).exists():
            return snap / inner
        looked.append(f"{snap / inner} (absent)")
    raise ResolveError(_MSG_NO_SAE_FILE.format(release=release, sae_id=sae_id, repo=repo_id, path=inner,
                                               looked="; ".join(looked)))
