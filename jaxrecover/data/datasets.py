"""Prompt sets and benchmark loaders: pure functions from files to frozen records.

Contract:
- Every loader returns a tuple of frozen dataclasses, in file order. Nothing is tokenised here and
  nothing is fetched from a hub: the project's own sets live in `jaxrecover/data/` (see `DATA_DIR`),
  and public benchmarks (AdvBench, HarmBench, WMDP) are read from files the caller already has.
- Bad input fails loudly: a missing file, a missing column or field, a wrong number of choices or an
  answer index out of range raises `DatasetError` naming the file, the row and the field.
- Multiple-choice questions follow the paper's strict protocol (notes §2.2): `format_mcq` is the
  prompt format, and `mcq_permutations` yields the 24 answer orders in `itertools.permutations`
  order, so `perm_id` 0..23 matches the paper's ids.
- IOI prompts (notes §2.3) use names, places and objects that are each one token with a leading
  space in the SmolLM2 tokenizer (checked by the tests), so all prompts from one template have the
  same token length and the answer is the single token `" " + io`.

What this module does *not* do: chat templating for models other than SmolLM2 (`format_chat` is the
SmolLM2 ChatML form only), and refusal judging (that is the metrics module's job).
"""

import ast
import csv
import dataclasses
import functools
import itertools
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

DATA_DIR = Path(__file__).resolve().parent  # this module lives beside its data files
CHOICE_LETTERS = ("A", "B", "C", "D")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_MSG_MISSING_FILE = "{path}: file not found ({what})."
_MSG_MISSING_FIELD = "{path}: row {row} has no field {field!r} (fields present: {present})."
_MSG_MISSING_COLUMN = "{path}: missing column {field!r} (columns present: {present})."
_MSG_BAD_FIELD = "{path}: row {row}, field {field!r}: {why}"
_MSG_DUPLICATE_ID = "{path}: row {row}, field 'id': duplicate id {value!r}."


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction prompt (harmful or harmless request, AdvBench goal, HarmBench behavior).

    Attributes:
        id: unique within its set.
        prompt: the user instruction, without any chat template.
        category: topic (own sets), FunctionalCategory (HarmBench), or "" (AdvBench).
        target: AdvBench's affirmative target ("Sure, here is ..."), else "".
        context: HarmBench ContextString (contextual behaviors), else "". HarmBench shows a
            contextual behavior as f"{context}\\n\\n---\\n\\n{prompt}"; combining is left to the caller.
    """

    id: str
    prompt: str
    category: str = ""
    target: str = ""
    context: str = ""


@dataclasses.dataclass(frozen=True)
class MCQ:
    """A 4-choice multiple-choice question; `answer` indexes `choices`."""

    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    topic: str = ""


@dataclasses.dataclass(frozen=True)
class PermutedMCQ:
    """One answer order of an MCQ: `choices[j] == source.choices[order[j]]`, gold at `answer`."""

    source: MCQ
    perm_id: int
    order: tuple[int, int, int, int]
    choices: tuple[str, str, str, str]
    answer: int


@dataclasses.dataclass(frozen=True)
class IOIPrompt:
    """An indirect-object-identification prompt; the correct next token is `" " + io`.

    Attributes:
        text: the prompt, ending just before the answer (e.g. "... Mary gave a ring to").
        io: the indirect object name (the answer), without leading space.
        s: the subject name (repeated in the prompt; the distractor), without leading space.
        kind: "BABA" (subject named first) or "ABBA" (indirect object named first).
        template_id: id of the template in `ioi_templates.json`.
        place, object: the fillers used ("" when the template has no such slot).
    """

    text: str
    io: str
    s: str
    kind: str
    template_id: str
    place: str
    object: str


@dataclasses.dataclass(frozen=True)
class Bio:
    """A short third-person biography labelled with a profession (TPP stand-in for Bias in Bios)."""

    id: str
    label: str
    text: str
    gender: str = ""


# ---------------------------------------------------------------------------------------------
# Reading helpers


def _check_exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(_MSG_MISSING_FILE.format(path=path, what=what))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file into dicts; blank lines are skipped."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {lineno} is not valid JSON ({e}).") from e
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: line {lineno} is not a JSON object.")
        rows.append(row)
    return rows


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Parse a CSV with a header row; every `required` column must be present."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for field in required:
                if field not in columns:
                    raise DatasetError(_MSG_MISSING_COLUMN.format(path=path, field=field, present=columns))
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the CSV as UTF-8.") from None
    if not rows:
        raise DatasetError(f"{path}: no data rows (only a header, or an empty file).")
    return rows


def _field(path: Path, row_index: int, row: Mapping[str, Any], field: str) -> Any:
    if field not in row:
        raise DatasetError(_MSG_MISSING_FIELD.format(path=path, row=row_index, field=field, present=sorted(row)))
    return row[field]


def _str_field(path: Path, row_index: int, row: Mapping[str, Any], field: str) -> str:
    value = _field(path, row_index, row, field)
    if not isinstance(value, str) or not value.strip():
        why = "must be a non-empty string"
        raise DatasetError(_MSG_BAD_FIELD.format(path=path, row=row_index, field=field, why=why))
    return value


def _check_unique_ids(path: Path, ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for row, value in enumerate(ids):
        if value in seen:
            raise DatasetError(_MSG_DUPLICATE_ID.format(path=path, row=row, value=value))
        seen.add(value)


# ---------------------------------------------------------------------------------------------
# Instructions


def load_instructions_jsonl(path: str | Path) -> tuple[Instruction, ...]:
    """Load a JSONL of {"id", "category", "prompt"} rows (the format of the project's own sets)."""
    path = Path(path)
    _check_exists(path, "instruction JSONL")
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        out.append(
            Instruction(
                id=_str_field(path, i, row, "id"),
                prompt=_str_field(path, i, row, "prompt"),
                category=_str_field(path, i, row, "category"),
            )
        )
    _check_unique_ids(path, [x.id for x in out])
    return tuple(out)


@functools.cache
def load_harmful() -> tuple[Instruction, ...]:
    """The project's ~120 harmful requests (AdvBench style, requests only), for refusal steering.

    >>> harmful = load_harmful()
    >>> harmful[0].category
    'violence'
    """
    return load_instructions_jsonl(DATA_DIR / "harmful_requests.jsonl")


@functools.cache
def load_harmless() -> tuple[Instruction, ...]:
    """The project's ~120 benign instructions (Alpaca style), the harmless side of refusal steering."""
    return load_instructions_jsonl(DATA_DIR / "harmless_instructions.jsonl")


def load_advbench_csv(path: str | Path) -> tuple[Instruction, ...]:
    """Load AdvBench `harmful_behaviors.csv` (columns `goal,target`).

    Ids are `advbench-{row:03d}` in file order, so the paper's "first 100 prompts" are `[:100]`.
    """
    path = Path(path)
    _check_exists(path, "AdvBench CSV with columns goal,target")
    rows = _read_csv(path, ("goal", "target"))
    out = []
    for i, row in enumerate(rows):
        out.append(
            Instruction(
                id=f"advbench-{i:03d}",
                prompt=_str_field(path, i, row, "goal"),
                target=row["target"] or "",
            )
        )
    return tuple(out)


_HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")


def load_harmbench_csv(path: str | Path, *, skip_contextual: bool = False) -> tuple[Instruction, ...]:
    """Load a HarmBench behaviors CSV.

    Args:
        path: CSV with columns Behavior, FunctionalCategory, SemanticCategory, Tags, ContextString,
            BehaviorID.
        skip_contextual: drop rows whose ContextString is non-empty (kept by default, with the
            context in `Instruction.context`).

    Returns:
        Instructions with `id` = BehaviorID, `prompt` = Behavior, `category` = FunctionalCategory.
    """
    path = Path(path)
    _check_exists(path, "HarmBench behaviors CSV")
    rows = _read_csv(path, _HARMBENCH_COLUMNS)
    out = []
    for i, row in enumerate(rows):
        context = (row["ContextString"] or "").strip()
        if skip_contextual and context:
            continue
        out.append(
            Instruction(
                id=_str_field(path, i, row, "BehaviorID"),
                prompt=_str_field(path, i, row, "Behavior"),
                category=row["FunctionalCategory"] or "",
                context=context,
            )
        )
    _check_unique_ids(path, [x.id for x in out])
    return tuple(out)


def format_chat(prompt: str, system: str = SMOLLM2_SYSTEM) -> str:
    """SmolLM2's ChatML rendering of one user turn, ending where the assistant starts.

    >>> format_chat("Hi").endswith("<|im_start|>assistant\\n")
    True
    """
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------------------------
# Multiple choice


def _parse_choices(path: Path, i: int, row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """Choices from a `choices` list (or its JSON/Python string form in CSV), or columns A..D."""
    if "choices" in row:
        value = row["choices"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError) as e:
                    why = f"cannot parse {value[:60]!r} as a list ({e})"
                    raise DatasetError(_MSG_BAD_FIELD.format(path=path, row=i, field="choices", why=why)) from e
    elif all(letter in row for letter in CHOICE_LETTERS):
        value = [row[letter] for letter in CHOICE_LETTERS]
    else:
        raise DatasetError(_MSG_MISSING_FIELD.format(path=path, row=i, field="choices", present=sorted(row)))
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(c, str) for c in value):
        why = f"must be a list of 4 strings, got {value!r}"
        raise DatasetError(_MSG_BAD_FIELD.format(path=path, row=i, field="choices", why=why))
    return (value[0], value[1], value[2], value[3])


def _parse_answer(path: Path, i: int, row: Mapping[str, Any]) -> int:
    """Gold index 0..3 from an int, a digit string or a letter A..D."""
    value = _field(path, i, row, "answer")
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.upper() in CHOICE_LETTERS:
            return CHOICE_LETTERS.index(stripped.upper())
        if stripped.lstrip("-").isdigit():
            value = int(stripped)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 4:
        why = f"must be an index 0..3 or a letter A..D, got {value!r}"
        raise DatasetError(_MSG_BAD_FIELD.format(path=path, row=i, field="answer", why=why))
    return value


def _read_mcq_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path, ("question", "answer"))
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e}).") from e
        # HF exports are either a list of rows or {"split": [rows]} / {"data": [rows]}.
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetError(f"{path}: expected a JSON list of question objects.")
        return data
    raise DatasetError(f"{path}: unsupported extension {suffix!r} (use .json, .jsonl or .csv).")


def load_mcq_json(path: str | Path) -> tuple[MCQ, ...]:
    """Load WMDP-style multiple-choice questions from JSON, JSONL or CSV.

    Each row needs `question`, `choices` (4 strings; in CSV a JSON or Python list literal, or columns
    A, B, C, D) and `answer` (index 0..3, or a letter). Optional: `id` (default `{stem}-{row:03d}`)
    and `topic`.

    >>> qs = load_mcq_json(DATA_DIR / "qa_bio.jsonl")
    >>> len(qs[0].choices), 0 <= qs[0].answer < 4
    (4, True)
    """
    path = Path(path)
    _check_exists(path, "multiple-choice questions (JSON, JSONL or CSV)")
    out = []
    for i, row in enumerate(_read_mcq_rows(path)):
        out.append(
            MCQ(
                id=str(row.get("id") or f"{path.stem}-{i:03d}"),
                question=_str_field(path, i, row, "question"),
                choices=_parse_choices(path, i, row),
                answer=_parse_answer(path, i, row),
                topic=str(row.get("topic") or ""),
            )
        )
    _check_unique_ids(path, [q.id for q in out])
    return tuple(out)


@functools.cache
def load_qa_bio() -> tuple[MCQ, ...]:
    """The project's 120 easy biology/virology/genetics/anatomy questions (forget-set stand-in for WMDP-Bio)."""
    return load_mcq_json(DATA_DIR / "qa_bio.jsonl")


@functools.cache
def load_qa_retain() -> tuple[MCQ, ...]:
    """The project's ~60 easy history/geography/general questions (retain set)."""
    return load_mcq_json(DATA_DIR / "qa_retain.jsonl")


def mcq_permutations(question: MCQ) -> Iterator[PermutedMCQ]:
    """All 24 answer orders of `question`, in `itertools.permutations(range(4))` order.

    The paper's strict protocol (notes §2.2) evaluates every order and keeps questions answered
    correctly under all 24. With `order = perm`, new choice j is old choice `perm[j]`, so the gold
    moves to `perm.index(question.answer)`.

    >>> p = list(mcq_permutations(load_qa_bio()[0]))
    >>> len(p), p[0].order
    (24, (0, 1, 2, 3))
    """
    for perm_id, order in enumerate(itertools.permutations(range(4))):
        choices = tuple(question.choices[j] for j in order)
        yield PermutedMCQ(
            source=question,
            perm_id=perm_id,
            order=(order[0], order[1], order[2], order[3]),
            choices=(choices[0], choices[1], choices[2], choices[3]),
            answer=order.index(question.answer),
        )


def format_mcq(question: str, choices: Sequence[str]) -> str:
    """The paper's MCQ prompt (no chat template); read the answer from " A".." D" next-token logits.

    >>> print(format_mcq("2+2?", ["3", "4", "5", "6"]))
    2+2?
    <BLANKLINE>
    A. 3
    B. 4
    C. 5
    D. 6
    <BLANKLINE>
    Answer:
    """
    if len(choices) != 4:
        raise ValueError(f"format_mcq needs exactly 4 choices, got {len(choices)}.")
    lines = "\n".join(f"{letter}. {c}" for letter, c in zip(CHOICE_LETTERS, choices))
    return f"{question}\n\n{lines}\n\nAnswer:"


# ---------------------------------------------------------------------------------------------
# IOI


def _load_json_list(name: str) -> tuple[str, ...]:
    path = DATA_DIR / name
    _check_exists(path, "packaged IOI word list")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(x, str) and x for x in data):
        raise DatasetError(f"{path}: expected a JSON list of non-empty strings.")
    if len(set(data)) != len(data):
        raise DatasetError(f"{path}: duplicate entries.")
    return tuple(data)


@functools.cache
def load_ioi_names() -> tuple[str, ...]:
    """100 first names, each one SmolLM2 token with a leading space (50 female, 50 male, alternating)."""
    return _load_json_list("ioi_names.json")


@functools.cache
def load_ioi_places() -> tuple[str, ...]:
    """Places for IOI templates, each one SmolLM2 token with a leading space."""
    return _load_json_list("ioi_places.json")


@functools.cache
def load_ioi_objects() -> tuple[str, ...]:
    """Objects for IOI templates, each one SmolLM2 token with a leading space."""
    return _load_json_list("ioi_objects.json")


@functools.cache
def load_ioi_templates() -> tuple[tuple[str, str, str], ...]:
    """(template_id, kind, template) triples; templates use [A] (io), [B] (s), [PLACE], [OBJECT].

    Templates stop before the answer, which is always " [A]". ABBA templates are the BABA ones with
    the first pair swapped (Easy-Transformer's construction).
    """
    path = DATA_DIR / "ioi_templates.json"
    _check_exists(path, "packaged IOI templates")
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, row in enumerate(_field(path, 0, data, "templates")):
        kind = _str_field(path, i, row, "kind")
        if kind not in ("BABA", "ABBA"):
            raise DatasetError(_MSG_BAD_FIELD.format(path=path, row=i, field="kind", why=f"unknown kind {kind!r}"))
        out.append((_str_field(path, i, row, "id"), kind, _str_field(path, i, row, "template")))
    _check_unique_ids(path, [t[0] for t in out])
    return tuple(out)


def ioi_prompts(
    n: int,
    seed: int,
    template_kind: Literal["BABA", "ABBA", "mixed"] = "BABA",
    template_index: int | None = None,
) -> tuple[IOIPrompt, ...]:
    """Sample `n` IOI prompts with distinct single-token names for io and s.

    Args:
        n: number of prompts.
        seed: seed for `random.Random`; the same arguments give the same prompts.
        template_kind: "BABA", "ABBA", or "mixed" (both kinds).
        template_index: use only the template at this index within the chosen kind, so that every
            prompt has the same token length and answer position (the paper uses one BABA template).

    Returns:
        Prompts whose correct next token is `" " + prompt.io` and whose distractor is `" " + prompt.s`.

    >>> p = ioi_prompts(2, seed=0, template_index=0)
    >>> p[0].text.endswith(" to"), p[0].io != p[0].s
    (True, True)
    """
    if template_kind not in ("BABA", "ABBA", "mixed"):
        raise ValueError(f"template_kind must be 'BABA', 'ABBA' or 'mixed', got {template_kind!r}.")
    templates = [t for t in load_ioi_templates() if template_kind == "mixed" or t[1] == template_kind]
    if template_index is not None:
        templates = [templates[template_index]]
    names, places, objects = load_ioi_names(), load_ioi_places(), load_ioi_objects()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template_id, kind, template = rng.choice(templates)
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        text = template.replace("[A]", io).replace("[B]", s).replace("[PLACE]", place).replace("[OBJECT]", obj)
        out.append(
            IOIPrompt(
                text=text,
                io=io,
                s=s,
                kind=kind,
                template_id=template_id,
                place=place if "[PLACE]" in template else "",
                object=obj if "[OBJECT]" in template else "",
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# TPP


def load_bios_jsonl(path: str | Path) -> tuple[Bio, ...]:
    """Load a JSONL of {"id", "label", "text"[, "gender"]} biographies."""
    path = Path(path)
    _check_exists(path, "biographies JSONL")
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        out.append(
            Bio(
                id=_str_field(path, i, row, "id"),
                label=_str_field(path, i, row, "label"),
                text=_str_field(path, i, row, "text"),
                gender=str(row.get("gender") or ""),
            )
        )
    _check_unique_ids(path, [b.id for b in out])
    return tuple(out)


@functools.cache
def load_tpp() -> tuple[Bio, ...]:
    """The project's 300 TPP biographies: 60 each for nurse, software_engineer, teacher, chef, attorney.

    Generated by `experiments/build_tpp_bios.py` (a Bias in Bios stand-in; notes §2.1).
    """
    return load_bios_jsonl(DATA_DIR / "tpp_bios.jsonl")
