"""Generate `jaxrecover/data/tpp_bios.jsonl`: short third-person biographies for a TPP-style probe task.

The paper's TPP experiment (notes §2.1) uses Bias in Bios, which cannot be downloaded here. This
script writes a deterministic stand-in: 60 biographies for each of 5 professions, built from
varied sentence templates and slot fillers, with female, male and neutral pronouns. Like Bias in
Bios "hard text", only some biographies name the profession; the rest describe the work.

Run from the repository root (no arguments); the output is committed, so rerun only to change it:

    .venv/bin/python experiments/build_tpp_bios.py
"""

import dataclasses
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "jaxrecover" / "data" / "tpp_bios.jsonl"


@dataclasses.dataclass(frozen=True)
class Config:
    per_label: int = 60
    seed: int = 0
    name_probability: float = 0.5  # fraction of bios whose first sentence names the profession


PRONOUNS = {
    "female": {"subj": "She", "obj": "her", "pos": "her", "be": "is", "have": "has", "s": "s"},
    "male": {"subj": "He", "obj": "him", "pos": "his", "be": "is", "have": "has", "s": "s"},
    "neutral": {"subj": "They", "obj": "them", "pos": "their", "be": "are", "have": "have", "s": ""},
}
FIRST = {
    "female": "Maria Aisha Emily Sofia Grace Hannah Priya Olivia Chloe Mei Fatima Laura Ingrid Rosa Nadia Keiko "
    "Amara Julia Elena Zoe".split(),
    "male": "James Ahmed Daniel Lucas Omar Wei Carlos David Samuel Ethan Hiroshi Ivan Kwame Mateo Ravi Thomas "
    "Jonas Peter Andre Felix".split(),
    "neutral": "Alex Jordan Taylor Morgan Casey Riley Jamie Robin Sam Quinn Avery Kai Charlie Drew Rowan Sky".split(),
}
LAST = (
    "Smith Garcia Chen Patel Okafor Novak Johansson Kim Rossi Silva Nguyen Cohen Murphy Haddad Tanaka Mueller "
    "Kowalski Mensah Fernandes Larsen Dubois Ivanova Brown Lopez Singh O'Brien Hughes Ward Moreau Yilmaz"
).split()
CITIES = (
    "Chicago Toronto Manchester Lyon Austin Melbourne Dublin Seattle Denver Glasgow Leeds Boston Portland Atlanta "
    "Ottawa Auckland Bristol Phoenix Madrid Nairobi"
).split()
YEARS = [str(y) for y in range(3, 31)]
HOBBIES = [
    "enjoy{s} hiking with {pos} family",
    "spend{s} weekends restoring old furniture",
    "{be} an avid reader of mystery novels",
    "play{s} the cello in a community orchestra",
    "coach{es} a youth soccer team",
    "love{s} gardening and growing tomatoes",
    "volunteer{s} at a local animal shelter",
    "run{s} half marathons whenever {subj_l} can",
    "collect{s} vintage postcards",
    "enjoy{s} baking bread on Sunday mornings",
    "practise{s} photography in {pos} free time",
    "{be} learning to speak Portuguese",
]

# Per profession: how the title is said, what the person studied, and what the work looks like.
PROFESSIONS = {
    "nurse": {
        "titles": ["registered nurse", "nurse", "pediatric nurse", "emergency room nurse", "nurse practitioner"],
        "places": ["a children's hospital", "a community clinic", "the intensive care unit", "a rural health centre"],
        "study": ["a nursing degree", "a bachelor of science in nursing", "a diploma in nursing"],
        "work": [
            "{subj} care{s} for patients recovering from surgery and keep{s} careful notes on their progress.",
            "{subj} work{s} twelve-hour night shifts, checking vital signs and giving medication on the ward.",
            "{subj} {be} known among colleagues for calming anxious patients and their families.",
            "Much of {pos} day is spent dressing wounds, starting IV lines and updating charts.",
            "{subj} also train{s} new staff on infection control and patient safety.",
            "{subj} {have} worked alongside doctors in the emergency department for most of {pos} career.",
        ],
    },
    "software_engineer": {
        "titles": ["software engineer", "software developer", "backend engineer", "senior software engineer"],
        "places": ["a fintech startup", "a large cloud company", "a video game studio", "an open-source foundation"],
        "study": ["a degree in computer science", "a master's in software engineering", "a coding bootcamp"],
        "work": [
            "{subj} write{s} and review{s} code for distributed systems that serve millions of users.",
            "{subj} specialise{s} in databases and spend{s} a lot of time making queries faster.",
            "{subj} maintain{s} a popular open-source library for parsing data files.",
            "Most days {subj_l} debug{s} production issues and write{s} automated tests.",
            "{subj} recently led the migration of an old monolith to a set of smaller services.",
            "{subj} enjoy{s} mentoring junior developers and giving talks on clean code.",
        ],
    },
    "teacher": {
        "titles": ["teacher", "primary school teacher", "high school teacher", "maths teacher", "history teacher"],
        "places": ["a public primary school", "a secondary school", "an international school", "a rural school"],
        "study": ["a degree in education", "a teaching certificate", "a master's in curriculum design"],
        "work": [
            "{subj} teach{es} a class of thirty students and plan{s} lessons every evening.",
            "{subj} {be} known for turning difficult topics into games that students love.",
            "{subj} grade{s} homework, meet{s} with parents and run{s} the school's science fair.",
            "Each year {subj_l} take{s} {pos} pupils on a field trip to the city museum.",
            "{subj} also lead{s} an after-school reading club for younger children.",
            "{subj} {have} written a short guide on classroom management for new staff.",
        ],
    },
    "chef": {
        "titles": ["chef", "head chef", "pastry chef", "sous chef", "executive chef"],
        "places": ["a busy bistro", "a seaside seafood restaurant", "a hotel kitchen", "a family-run trattoria"],
        "study": ["culinary school", "an apprenticeship in a French kitchen", "a diploma in culinary arts"],
        "work": [
            "{subj} design{s} a seasonal menu around produce from local farms.",
            "{subj} run{s} a kitchen of twelve cooks during the dinner rush.",
            "{subj} {be} best known for {pos} slow-braised stews and handmade pasta.",
            "Every morning {subj_l} check{s} the deliveries and taste{s} every sauce before service.",
            "{subj} recently published a small cookbook of family recipes.",
            "{subj} teach{es} weekend cooking classes for beginners.",
        ],
    },
    "attorney": {
        "titles": ["attorney", "lawyer", "criminal defense attorney", "corporate lawyer", "immigration attorney"],
        "places": ["a small law firm", "a large corporate firm", "a legal aid office", "the public defender's office"],
        "study": ["a law degree", "a juris doctor", "a degree in law followed by the bar exam"],
        "work": [
            "{subj} represent{s} clients in court and draft{s} contracts and motions.",
            "{subj} specialise{s} in employment disputes and negotiate{s} settlements.",
            "{subj} {have} argued cases before the state appeals court.",
            "Much of {pos} week is spent reviewing evidence and preparing witnesses for trial.",
            "{subj} also offer{s} free legal advice to tenants facing eviction.",
            "{subj} {be} a member of the state bar association's ethics committee.",
        ],
    },
}
GENDER_CYCLE = ("female", "male", "female", "male", "neutral")  # 40% / 40% / 20%
OPENERS_NAMED = [
    "{name} is {a_title} at {place} in {city}.",
    "{name} has worked as {a_title} for {years} years.",
    "{name} is {a_title} based in {city}.",
    "{name} works as {a_title} at {place}.",
]
OPENERS_UNNAMED = [
    "{name} lives in {city} and works at {place}.",
    "{name} has spent {years} years at {place} in {city}.",
    "{name} grew up in {city} and now works at {place}.",
    "Based in {city}, {name} has been at {place} for {years} years.",
]
STUDY = [
    "{subj} earned {study} before starting {pos} career.",
    "{subj} completed {study} in {city}.",
    "After finishing {study}, {subj_l} moved to {city}.",
]


def _fill(template: str, slots: dict[str, str]) -> str:
    """Fill slots; handles the neutral-pronoun verb forms ({s}, {es})."""
    return template.format(**slots, es="es" if slots["s"] else "")


def _bio(rng: random.Random, label: str, gender: str, cfg: Config) -> str:
    prof = PROFESSIONS[label]
    pron = PRONOUNS[gender]
    name = f"{rng.choice(FIRST[gender])} {rng.choice(LAST)}"
    title = rng.choice(prof["titles"])
    slots = {
        **pron,
        "subj_l": pron["subj"].lower(),
        "name": name,
        "title": title,
        "a_title": ("an " if title[0] in "aeiou" else "a ") + title,
        "place": rng.choice(prof["places"]),
        "city": rng.choice(CITIES),
        "years": rng.choice(YEARS),
        "study": rng.choice(prof["study"]),
    }
    named = rng.random() < cfg.name_probability
    sentences = [_fill(rng.choice(OPENERS_NAMED if named else OPENERS_UNNAMED), slots)]
    middle = rng.sample(prof["work"], k=rng.randint(2, 3))
    if rng.random() < 0.6:
        middle.append(_fill(rng.choice(STUDY), slots))
    rng.shuffle(middle)
    sentences += [_fill(s, slots) for s in middle]
    if rng.random() < 0.5:
        hobby = _fill(rng.choice(HOBBIES), slots)
        sentences.append(f"Outside work, {slots['subj_l']} {hobby}.")
    return " ".join(sentences)


def main(cfg: Config = Config()) -> list[dict]:
    """Write the biographies file and return its rows."""
    rng = random.Random(cfg.seed)
    rows: list[dict] = []
    for label in PROFESSIONS:
        seen: set[str] = set()
        i = 0
        while i < cfg.per_label:
            gender = GENDER_CYCLE[i % len(GENDER_CYCLE)]
            text = _bio(rng, label, gender, cfg)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"id": f"{label}-{i:03d}", "label": label, "gender": gender, "text": text})
            i += 1
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    out = main()
    print(f"wrote {len(out)} biographies to {OUT}")
