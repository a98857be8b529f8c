"""The behaviours an audit recovers, and the prompt rows they are measured on.

A behaviour turns prompt rows into stacked ``recover.solver.Example`` s plus an objective / success
pair (``recover.objectives``), and says which rows are valid flips (base model right, clamped model
wrong). Four behaviours:

======================  =================================================================================
``continuation``        the base model's own greedy continuation (``answer_tokens`` of it), teacher-forced;
                        success = greedy decoding reproduces every one of those tokens
                        (``continuation_logprob`` / ``continuation_success``); flip = the base model
                        reproduces its continuation teacher-forced and the clamped model does not
``refusal``             the base model's own answer, teacher-forced (``refusal_stage2``); flip = the
                        paper's strict-valid filter on generations (base complies, clamped refuses)
``choice``              a multiple-choice question, read at the last prompt slot over the option tokens:
                        letters ``' A'``, ``' B'``, ... after ``datasets.format_mcq``, or (cloze) the first
                        token of ``' ' + option`` after the prompt as written (``choice_ce``); flip = base
                        right, clamped wrong
``logit_diff``          ``logit[target] - logit[foil]`` at the last prompt slot (the first token of each
                        string as written: include the leading space, ``' Mary'``); flip = base > 0,
                        clamped <= 0
======================  =================================================================================

Rows: ``.jsonl`` (one object a line) or ``.csv`` (a header row; ``choices`` separated by ``|``), or a
built-in set of the package (``builtin:harmful`` ...). Every bad row is one line naming the file and
the line. Everything here is host-side numpy or one batched forward pass; nothing loops per token.
"""

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.data import datasets
from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R

TEXT_FIELDS = ("prompt", "text", "question")
LETTERS = "ABCDEFGHIJ"


def _fail(where: str, msg: str) -> SystemExit:
    return SystemExit(f"{where}: {msg}")


# ----------------------------------------------------------------------------- reading rows


def _builtin(spec: str) -> list[dict[str, Any]]:
    name = spec.split(":", 1)[1]
    if name in ("harmful", "harmless"):
        items = datasets.load_harmful() if name == "harmful" else datasets.load_harmless()
        return [{"prompt": it.prompt} for it in items]
    qs = datasets.load_qa_bio() if name == "qa_bio" else datasets.load_qa_retain()
    return [{"question": q.question, "choices": list(q.choices), "answer": q.answer} for q in qs]


def _raw_rows(key: str, spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``[(where, row)]``: every row of the file with the place to name in messages."""
    if spec.startswith("builtin:"):
        return [(f"{key} {spec} row {i}", r) for i, r in enumerate(_builtin(spec))]
    path = Path(spec)
    out = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                for i, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
                    out.append((f"{key} {path} line {i}", {k: v for k, v in row.items() if k is not None}))
        else:
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _fail(f"{key} {path} line {i}", f"not valid JSON ({e.msg}).") from None
                if not isinstance(row, dict):
                    raise _fail(f"{key} {path} line {i}", "expected a JSON object per line.")
                out.append((f"{key} {path} line {i}", row))
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{key} {path}: unreadable ({e}).") from None
    if not out:
        raise SystemExit(f"{key} {spec}: no rows.")
    return out


def _text(where: str, row: Mapping[str, Any], fields: Sequence[str] = TEXT_FIELDS) -> str:
    for f in fields:
        v = row.get(f)
        if isinstance(v, str) and v.strip():
            return v
    raise _fail(where, f"no non-empty text field (one of {', '.join(fields)}).")


def _choices(where: str, row: Mapping[str, Any]) -> tuple[str, ...]:
    c = row.get("choices")
    if isinstance(c, str):
        c = [s.strip() for s in c.split("|")]
    if not isinstance(c, list) or len(c) < 2 or any(not isinstance(s, str) or not s.strip() for s in c):
        raise _fail(where, "'choices' must list at least 2 non-empty strings (CSV: separated by '|').")
    if len(c) > len(LETTERS):
        raise _fail(where, f"{len(c)} choices; at most {len(LETTERS)}.")
    return tuple(c)


def _answer(where: str, row: Mapping[str, Any], choices: tuple[str, ...]) -> int:
    a = row.get("answer")
    if isinstance(a, str):
        s = a.strip()
        if s.isdigit():
            a = int(s)
        elif len(s) == 1 and s.upper() in LETTERS[: len(choices)]:
            a = LETTERS.index(s.upper())
        elif s in choices:
            a = choices.index(s)
    if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(choices):
        raise _fail(where, f"'answer' {row.get('answer')!r}: expected an index 0..{len(choices) - 1}, a letter "
                           f"A..{LETTERS[len(choices) - 1]} or one of the choices.")
    return a


def read_rows(key: str, spec: str, behaviour: str, limit: int = 0) -> list[dict[str, Any]]:
    """The first ``limit`` rows of ``spec`` (0 = all), checked and normalised for ``behaviour``:
    ``{"prompt"}`` | ``{"prompt", "choices", "answer"}`` | ``{"prompt", "target", "foil"}``."""
    raw = _raw_rows(key, spec)
    raw = raw[:limit] if limit else raw
    out = []
    for where, row in raw:
        if behaviour == "choice":
            choices = _choices(where, row)
            out.append({"prompt": _text(where, row, ("question", "prompt", "text")), "choices": choices,
                        "answer": _answer(where, row, choices), "where": where})
        elif behaviour == "logit_diff":
            pair = {}
            for f in ("target", "foil"):
                v = row.get(f)
                if not isinstance(v, str) or not v:
                    raise _fail(where, f"no {f!r} string (logit_diff rows need prompt, target and foil).")
                pair[f] = v
            out.append({"prompt": _text(where, row, ("prompt", "text")), **pair, "where": where})
        else:
            out.append({"prompt": _text(where, row), "where": where})
    if behaviour == "choice" and len({len(r["choices"]) for r in out}) > 1:
        counts = sorted({len(r["choices"]) for r in out})
        raise SystemExit(f"{key} {spec}: rows have {counts} choices; every question of one audit needs the same number.")
    return out


def read_texts(key: str, spec: str, limit: int = 0) -> list[str]:
    """Texts of a contrast / retain file (any row with a prompt, text or question)."""
    raw = _raw_rows(key, spec)
    return [_text(where, row) for where, row in (raw[:limit] if limit else raw)]


# ----------------------------------------------------------------------------- prompt texts and tokens


def prompt_text(row: Mapping[str, Any], behaviour: str, choice_format: str) -> str:
    """The prompt as the model sees it (before any chat template)."""
    if behaviour == "choice" and choice_format == "letters":
        if len(row["choices"]) != 4:  # format_mcq is the 4-choice layout of the unlearning setting
            return row["prompt"] + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(row["choices"])) + "Answer:"
        return datasets.format_mcq(row["prompt"], row["choices"])
    return row["prompt"]


def first_token(tok: Any, text: str) -> int | None:
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    return int(ids[0]) if ids else None


def option_ids(tok: Any, row: Mapping[str, Any], cfg: Any) -> list[int | None]:
    """The token each option is scored on (letters, or the first token of ' ' + option)."""
    if cfg.choice_format == "letters":
        return [first_token(tok, " " + LETTERS[i]) for i in range(len(row["choices"]))]
    return [first_token(tok, " " + c) for c in row["choices"]]


def check_tokens(rows: Sequence[Mapping[str, Any]], cfg: Any, tok: Any) -> None:
    """Scored tokens are distinct where the behaviour compares them (one line naming the row)."""
    for row in rows:
        if cfg.behaviour == "choice":
            ids = option_ids(tok, row, cfg)
            if None in ids or len(set(ids)) != len(ids):
                raise _fail(row["where"], f"the options {list(row['choices'])} do not start with distinct tokens "
                                          f"({ids}); {cfg.choice_format} scoring reads one token per option.")
        elif cfg.behaviour == "logit_diff":
            t, f = first_token(tok, row["target"]), first_token(tok, row["foil"])
            if t is None or f is None or t == f:
                raise _fail(row["where"], f"target {row['target']!r} and foil {row['foil']!r} start with the same token "
                                          f"({t}); give a token pair that differs in its first token.")


# ----------------------------------------------------------------------------- examples


def readout_examples(tok: Any, texts: Sequence[str], rows: Sequence[Mapping[str, Any]], cfg: Any) -> R.Example:
    """choice / logit_diff: left-padded prompts, ONE delta row and the readout at the last slot."""
    from jaxrecover.model.tokenizer import encode_batch

    tokens, valid = encode_batch(tok, list(texts), pad_to=8)
    n, seq = tokens.shape
    last = seq - 1
    if cfg.behaviour == "choice":
        target = O.ChoiceTarget(slot=jnp.full((n,), last, jnp.int32),
                                choice_ids=jnp.asarray(np.asarray([option_ids(tok, r, cfg) for r in rows], np.int32)),
                                correct=jnp.asarray(np.asarray([r["answer"] for r in rows], np.int32)))
    else:
        target = O.LogitDiffTarget(slot=jnp.full((n, 1), last, jnp.int32),
                                   io=jnp.asarray(np.asarray([[first_token(tok, r["target"])] for r in rows], np.int32)),
                                   s=jnp.asarray(np.asarray([[first_token(tok, r["foil"])] for r in rows], np.int32)))
    measure = np.zeros((n, seq), bool)
    measure[:, last] = True  # drift is read where the delta acts and the answer is read
    return R.Example(tokens=jnp.asarray(tokens[:, None]), valid=jnp.asarray(valid[:, None]),
                     delta_slots=jnp.full((n, 1), last, jnp.int32), measure_mask=jnp.asarray(measure), target=target)


@dataclasses.dataclass(frozen=True)
class Answers:
    """continuation / refusal examples: prompt (left-padded to ``P`` slots) + the base answer."""

    examples: R.Example
    prompt_tokens: np.ndarray  # [n, P]
    prompt_valid: np.ndarray
    slots: np.ndarray  # [rows] delta slots: the last prompt token and the answer slots
    P: int


def answer_examples(tok: Any, texts: Sequence[str], base_ids: Sequence[Sequence[int]], answer_tokens: int,
                    discouraged: Sequence[int]) -> Answers:
    """The refusal setting's teacher-forced layout (``paper.refusal.build_batch`` / ``examples_for``):
    delta rows at slot P-1 (the last prompt token) and the ``answer_tokens`` answer slots after it."""
    import types

    from jaxrecover.paper import refusal

    batch = refusal.build_batch(tok, list(texts), [list(b) for b in base_ids], types.SimpleNamespace(answer_tokens=answer_tokens))
    slots = np.arange(batch.prompt_len - 1, batch.prompt_len - 1 + answer_tokens, dtype=np.int32)
    ex = refusal.examples_for(batch, list(discouraged) or [-1], slots)
    P = batch.prompt_len
    return Answers(ex, batch.tokens[:, :P], batch.valid[:, :P], slots, P)


def task(behaviour: str) -> tuple[Any, Any]:
    """``(objective, success)`` of a behaviour."""
    return {"continuation": (O.continuation_logprob, O.continuation_success),
            "refusal": (O.refusal_stage2, O.continuation_success),
            "choice": (O.choice_ce, O.choice_success),
            "logit_diff": (O.logit_diff, O.logit_diff_success)}[behaviour]


def success_under(model: Any, ex: R.Example, hooks: Mapping[Any, Any] | None, success: Any, batch: int = 8) -> np.ndarray:
    """``success`` of a plain forward pass (``hooks`` on, no delta) for every example, in fixed-size
    chunks (the last one wrapped: one compile)."""
    from jaxrecover.experiment import suite as S
    from jaxrecover.model.transformer import forward

    def one(mdl, hk, e):
        logits = jax.vmap(lambda t, v: forward(mdl, t, hk, valid=v))(e.tokens, e.valid)
        return success(O.Readout(logits=logits), e.target)

    fn = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
    n = int(np.shape(ex.tokens)[0])
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch) % n
        out.append(np.asarray(fn(model, dict(hooks or {}), S.take(ex, idx)))[: min(batch, n - start)])
    return np.concatenate(out).astype(bool)
