"""Seeded synthetic worlds for QA, multi-hop QA and entity linking, written in onegen's native formats.

A world is a set of fictional people, towns and companies with syllable-made names, linked by facts
(a town's founder, a company's home town, a person's birthplace). Name parts are shared on purpose
("Ilsa Brandt" / "Kerrin Brandt" / "Brandt Works", "Velmora" / "Velmora Falls"), so matching names
alone does not find the right document; those look-alikes are the hard negatives of training samples.

Guarantees, for `synth(task, out_dir, seed, size)`:
- the same arguments give byte-identical files (only `random.Random(seed)` is used, no set order);
- every answer appears verbatim in its hop's document, and each assistant turn holds exactly one query
  token per retrieval entry, with the document text exactly as in `corpus.jsonl`;
- about 22% of the entities (at least two of each kind) are held out: no training sample asks about
  them or retrieves them, and every evaluation item is about one of them;
- each relation has training templates and held-out templates; the latter appear only in `eval.jsonl`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OneGenError
from .io import write_json_atomic, write_jsonl_atomic

TASKS = ("qa", "multihop", "el")
DEFAULT_TOKENS = {"query": "[RQ]", "doc": "[RD]", "open": "<paragraph>", "close": "</paragraph>"}
MIN_SIZE = 20
HELD_OUT_FRACTION = 0.22
TRAIN_PER_ENTITY = 3  # training samples per entity that may be asked about
EVAL_FRACTION = 0.2  # evaluation items per training sample

ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t",
          "th", "v", "w")
MIDDLES = ("b", "d", "g", "l", "m", "n", "r", "s", "t", "v", "th")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ia", "ei")
CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "rn", "m", "ck")
TOWN_SUFFIXES = ("Falls", "Ford", "Hill", "Cross", "Bay")
ORG_SUFFIXES = ("Works", "Company", "Group", "Holdings", "Trading", "Partners", "Guild")
OCCUPATIONS = ("painter", "baker", "surveyor", "clockmaker", "weaver", "printer", "sailor", "teacher",
               "miner", "glassblower", "architect", "engineer", "botanist", "judge", "merchant", "poet")
INDUSTRIES = ("shipbuilding", "textile", "printing", "brewing", "mining", "timber", "glassware",
              "banking", "shipping", "pottery", "rope", "salt")

# Question relations: name -> (path, training templates, held-out templates). A path follows links
# (each a hop whose output is the next entity's name) and ends in a fact (the answer).
Templates = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
RELATIONS: dict[str, Templates] = {
    "birthplace": (("birthplace",), (
        "Where was {x} born?", "In which town was {x} born?", "What is the birthplace of {x}?",
        "{x} was born in which town?"), ("Which town is the hometown of {x}?", "Name the town where {x} was born.")),
    "residence": (("residence",), (
        "Where did {x} settle later in life?", "In which town did {x} later settle?",
        "Where did {x} eventually live?", "{x} later settled in which town?"),
        ("Which town did {x} finally move to?", "Name the town where {x} settled.")),
    "birth_year": (("birth_year",), (
        "When was {x} born?", "In what year was {x} born?", "What year was {x} born in?",
        "{x} was born in which year?"), ("What is the birth year of {x}?", "Which year saw the birth of {x}?")),
    "occupation": (("occupation",), (
        "What was {x}'s occupation?", "What did {x} do for a living?", "What job did {x} have?",
        "What was the profession of {x}?"), ("{x} worked as what?", "Which trade is {x} known for?")),
    "region": (("region",), (
        "In which region is {x}?", "Which region is {x} in?", "{x} lies in which region?",
        "Where is the town of {x}?"),
        ("What region contains the town of {x}?", "Name the region where {x} can be found.")),
    "founder": (("founder",), (
        "Who founded {x}?", "Who was the founder of {x}?", "{x} was founded by whom?",
        "Which person founded {x}?"), ("Who established {x}?", "Name the founder of {x}.")),
    "founding_year": (("founding_year",), (
        "When was {x} founded?", "In what year was {x} founded?", "What year was {x} founded in?",
        "{x} was founded in which year?"),
        ("In which year was {x} established?", "What is the founding year of {x}?")),
    "industry": (("industry",), (
        "What industry is {x} in?", "What kind of company is {x}?", "In which industry does {x} work?",
        "What business is {x} in?"), ("{x} belongs to which industry?", "Name the industry of {x}.")),
    "location": (("location",), (
        "Where is {x} based?", "In which town is {x} based?", "{x} is based in which town?",
        "Where are the offices of {x}?"), ("Which town is home to {x}?", "Name the town where {x} has its base.")),
}
COMPOSITES: dict[str, Templates] = {
    "founder_birthplace": (("founder", "birthplace"), (
        "In which town was the founder of {x} born?", "Where was the founder of {x} born?",
        "What is the birthplace of the person who founded {x}?", "The founder of {x} was born in which town?"),
        ("Which town is the hometown of the founder of {x}?", "Name the town where the founder of {x} was born.")),
    "founder_occupation": (("founder", "occupation"), (
        "What was the occupation of the founder of {x}?", "What did the founder of {x} do for a living?",
        "What job did the person who founded {x} have?", "What was the profession of the founder of {x}?"),
        ("The founder of {x} worked as what?", "Which trade is the founder of {x} known for?")),
    "founder_birth_year": (("founder", "birth_year"), (
        "When was the founder of {x} born?", "In what year was the founder of {x} born?",
        "What year was the person who founded {x} born in?", "The founder of {x} was born in which year?"),
        ("What is the birth year of the founder of {x}?", "Which year saw the birth of the founder of {x}?")),
    "location_region": (("location", "region"), (
        "In which region is the town where {x} is based?", "Which region is {x}'s home town in?",
        "{x} is based in a town in which region?", "In what region is the town that hosts {x}?"),
        ("What region contains the town where {x} is based?", "Name the region of the town that is home to {x}.")),
    "birthplace_region": (("birthplace", "region"), (
        "In which region was {x} born?", "Which region is the birthplace of {x} in?",
        "{x} was born in a town in which region?", "In what region is the town where {x} was born?"),
        ("What region contains the hometown of {x}?", "Name the region of the town where {x} was born.")),
    "birthplace_founder": (("birthplace", "founder"), (
        "Who founded the town where {x} was born?", "Who was the founder of {x}'s birthplace?",
        "The birthplace of {x} was founded by whom?", "Which person founded the town in which {x} was born?"),
        ("Who established the hometown of {x}?", "Name the founder of the town where {x} was born.")),
}
# Entity-linking sentences: {p..} a person, {t..} a town, {o..} a company (distinct entities per slot).
EL_TEMPLATES = ("Crowds gathered to hear {p} speak.", "{o} reported a strong year.", "{p} gave a talk in {t}.",
                "{p} joined {o} last spring.", "{o} opened a new office in {t}.",
                "{p} met {p2} at the market in {t}.", "A fair in {t} drew visitors from {t2}.")
EL_HELD_OUT = ("Last winter {p} wrote a letter to {o}.", "The road from {t} to {t2} was repaired by {o}.")
SLOT_KINDS = {"p": "person", "t": "town", "o": "org"}


@dataclass(eq=False)
class Entity:
    """One thing in the world; `facts` are answer strings, `links` other entities; `text` is its document."""

    kind: str
    name: str
    parts: tuple[str, ...]  # the generated words of the name, shared with look-alikes
    year: int
    facts: dict[str, str] = field(default_factory=dict)
    links: dict[str, Entity] = field(default_factory=dict, repr=False)
    id: str = ""
    text: str = ""


@dataclass
class World:
    """All entities (in corpus order), the held-out ids, and each entity's look-alikes."""

    entities: list[Entity]
    held_out: set[str]
    look_alikes: dict[str, list[Entity]]

    def of_kind(self, kind: str, held_out: bool | None = None) -> list[Entity]:
        return [e for e in self.entities
                if e.kind == kind and (held_out is None or (e.id in self.held_out) == held_out)]

    def negatives(self, rng: random.Random, entity: Entity) -> list[str]:
        """2-3 hard negatives: entities sharing a name part, topped up with ones of the same kind."""
        near = self.look_alikes[entity.id]
        picked = rng.sample(near, min(rng.choice((2, 3)), len(near)))
        if len(picked) < 2:
            rest = [e for e in self.of_kind(entity.kind) if e is not entity and e not in picked]
            picked += rng.sample(rest, 2 - len(picked))
        return [e.id for e in picked]


@dataclass
class Question:
    """A question with its hops: (document entity, text generated after that document)."""

    text: str
    hops: list[tuple[Entity, str]]
    held_out_template: bool


class _Namer:
    """Makes distinct capitalised words from syllables."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self) -> str:
        rng = self.rng
        while True:
            n = rng.choice((2, 2, 3))
            w = rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(("", "l", "r", "n")) if n == 2 else "")
            w += "".join(rng.choice(MIDDLES) + rng.choice(VOWELS) for _ in range(n - 1))
            w = (w + rng.choice(CODAS)).capitalize()
            if 4 <= len(w) <= 8 and w not in self.used:
                self.used.add(w)
                return w


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique_names(rng: random.Random, n: int, stems: list[str], suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """`n` distinct (stem, suffix) pairs; callers keep n well below len(stems) * len(suffixes)."""
    names: list[tuple[str, str]] = []
    while len(names) < n:
        pair = (rng.choice(stems), rng.choice(suffixes))
        if pair not in names:
            names.append(pair)
    return names


def _people(rng: random.Random, namer: _Namer, n: int) -> list[Entity]:
    pool = max(3, math.isqrt(n) + 1, round(n / 2.5))  # ~2.5 people share each first and each last name
    firsts = [namer.word() for _ in range(pool)]
    lasts = [namer.word() for _ in range(pool)]
    people = []
    for first, last in rng.sample([(f, s) for f in firsts for s in lasts], n):
        year = rng.randint(1700, 1900)
        facts = {"birth_year": str(year), "occupation": rng.choice(OCCUPATIONS)}
        people.append(Entity("person", f"{first} {last}", (first, last), year, facts))
    return people


def _towns(rng: random.Random, namer: _Namer, n: int, people: list[Entity]) -> list[Entity]:
    regions = [namer.word() for _ in range(max(2, n // 8))]
    stems = [namer.word() for _ in range(math.ceil(n * 0.6))]
    variants = _unique_names(rng, n - len(stems), stems, TOWN_SUFFIXES)
    towns = []
    for parts in [(s,) for s in stems] + variants:
        founder = rng.choice(people)
        year = founder.year + rng.randint(25, 60)
        facts = {"region": rng.choice(regions), "founder": founder.name, "founding_year": str(year)}
        towns.append(Entity("town", " ".join(parts), parts[:1], year, facts, {"founder": founder}))
    return towns


def _place_people(rng: random.Random, people: list[Entity], towns: list[Entity]) -> None:
    """Give everyone a birthplace that already existed when they were born, and a later home."""
    for person in people:
        older = [t for t in towns if t.year <= person.year and t.links["founder"] is not person]
        birthplace = rng.choice(older or towns)
        residence = rng.choice([t for t in towns if t is not birthplace])
        person.links.update(birthplace=birthplace, residence=residence)
        person.facts.update(birthplace=birthplace.name, residence=residence.name)


def _orgs(rng: random.Random, n: int, people: list[Entity], towns: list[Entity]) -> list[Entity]:
    stems = list(dict.fromkeys([t.parts[0] for t in towns] + [p.parts[1] for p in people]))
    orgs = []
    for parts in _unique_names(rng, n, stems, ORG_SUFFIXES):
        founder = rng.choice(people)
        year = founder.year + rng.randint(20, 55)
        location = rng.choice([t for t in towns if t.year <= year] or towns)
        facts = {"industry": rng.choice(INDUSTRIES), "location": location.name, "founder": founder.name,
                 "founding_year": str(year)}
        orgs.append(Entity("org", " ".join(parts), parts[:1], year, facts,
                           {"founder": founder, "location": location}))
    return orgs


def _document(e: Entity) -> str:
    f = e.facts
    if e.kind == "person":
        occupation = f["occupation"]
        return (f"{e.name} was {_article(occupation)} {occupation} born in {f['birthplace']} in "
                f"{f['birth_year']}. {e.parts[1]} later settled in {f['residence']}.")
    founded = f"It was founded by {f['founder']} in {f['founding_year']}."
    if e.kind == "town":
        return f"{e.name} is a town in {f['region']}. {founded}"
    industry = f["industry"]
    return f"{e.name} is {_article(industry)} {industry} company based in {f['location']}. {founded}"


def build_world(rng: random.Random, size: int) -> World:
    """Make about `size` entities (40% people, 30% towns, 30% companies) and hold out ~22% of each kind."""
    namer = _Namer(rng)
    n_people, n_towns = round(size * 0.4), round(size * 0.3)
    people = _people(rng, namer, n_people)
    towns = _towns(rng, namer, n_towns, people)
    _place_people(rng, people, towns)
    entities = people + towns + _orgs(rng, size - n_people - n_towns, people, towns)
    rng.shuffle(entities)
    by_part: dict[str, list[Entity]] = {}
    for i, e in enumerate(entities):
        e.id, e.text = f"d{i}", _document(e)
        for part in e.parts:
            by_part.setdefault(part, []).append(e)
    look_alikes = {e.id: [o for o in dict.fromkeys(x for p in e.parts for x in by_part[p]) if o is not e]
                   for e in entities}
    held_out: set[str] = set()
    for kind in SLOT_KINDS.values():
        group = [e for e in entities if e.kind == kind]
        held_out.update(e.id for e in rng.sample(group, max(2, round(HELD_OUT_FRACTION * len(group)))))
    return World(entities, held_out, look_alikes)


def _hops(subject: Entity, path: tuple[str, ...]) -> list[tuple[Entity, str]] | None:
    """Follow `path` from `subject`: each link hop outputs the next entity's name, the last the fact."""
    hops, current = [], subject
    for key in path[:-1]:
        if key not in current.links:
            return None
        hops.append((current, current.links[key].name))
        current = current.links[key]
    if path[-1] not in current.facts:
        return None
    return hops + [(current, current.facts[path[-1]])]


def _interleave(groups: list[list[Any]]) -> list[Any]:
    """Round-robin over the groups: first items of all, then second items, ..."""
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def _questions(rng: random.Random, subject: Entity, relations: dict[str, Templates], with_held_out: bool,
               allowed: Callable[[list[tuple[Entity, str]]], bool]) -> list[Question]:
    """All questions about `subject`, shuffled so that consecutive ones use different relations."""
    per_relation = []
    for path, train_templates, held_templates in relations.values():
        hops = _hops(subject, path)
        if hops is None or not allowed(hops):
            continue
        templates = [(t, False) for t in train_templates] + [(t, True) for t in held_templates if with_held_out]
        rng.shuffle(templates)
        per_relation.append([Question(t.format(x=subject.name), hops, h) for t, h in templates])
    rng.shuffle(per_relation)
    return _interleave(per_relation)


def _spread(rng: random.Random, groups: list[list[Any]], total: int) -> list[Any]:
    """Pick `total` items spread evenly over the groups, in random order."""
    rng.shuffle(groups)
    picked = _interleave(groups)[:total]
    rng.shuffle(picked)
    return picked


def _qa_rows(rng: random.Random, world: World, relations: dict[str, Templates],
             tokens: dict[str, str]) -> tuple[list[dict], list[dict], list[str]]:
    """Training samples about kept entities, evaluation items about held-out ones."""
    kept = [e for e in world.entities if e.id not in world.held_out]
    held = [e for e in world.entities if e.id in world.held_out]

    def clean(hops: list[tuple[Entity, str]]) -> bool:
        return all(e.id not in world.held_out for e, _ in hops)

    train_qs = _spread(rng, [_questions(rng, e, relations, False, clean) for e in kept],
                       TRAIN_PER_ENTITY * len(kept))
    eval_qs = _spread(rng, [_questions(rng, e, relations, True, lambda hops: True) for e in held],
                      round(EVAL_FRACTION * len(train_qs)))
    train = []
    for i, q in enumerate(train_qs):
        answer = "".join(f"{tokens['query']}{tokens['open']}{e.text}{tokens['close']}{out}" for e, out in q.hops)
        train.append({"id": f"train-{i}", "messages": [{"role": "user", "content": q.text},
                                                      {"role": "assistant", "content": answer}],
                      "retrievals": [{"positives": [e.id], "negatives": world.negatives(rng, e)}
                                     for e, _ in q.hops]})
    evals = [{"id": f"eval-{i}", "question": q.text, "answers": [q.hops[-1][1]],
              "gold_docs": [[e.id] for e, _ in q.hops]} for i, q in enumerate(eval_qs)]
    held_ids = [row["id"] for row, q in zip(evals, eval_qs, strict=True) if q.held_out_template]
    return train, evals, held_ids


def _el_item(rng: random.Random, world: World, template: str, held_out: bool, item_id: str) -> dict:
    """Fill a sentence template with distinct entities; spans cover each entity's full name."""
    pieces = re.split(r"\{(\w+)\}", template)
    slots = pieces[1::2]
    fill: dict[str, Entity] = {}
    for letter, kind in SLOT_KINDS.items():
        names = [s for s in slots if s[0] == letter]
        fill.update(zip(names, rng.sample(world.of_kind(kind, held_out), len(names)), strict=True))
    text, spans = "", []
    for i, piece in enumerate(pieces):
        if i % 2:
            spans.append({"start": len(text), "end": len(text) + len(fill[piece].name), "id": fill[piece].id})
            piece = fill[piece].name
        text += piece
    return {"id": item_id, "text": text, "entities": spans}


def _el_rows(rng: random.Random, world: World) -> tuple[list[dict], list[dict], list[str]]:
    n_train = TRAIN_PER_ENTITY * (len(world.entities) - len(world.held_out))
    train = [_el_item(rng, world, rng.choice(EL_TEMPLATES), False, f"train-{i}") for i in range(n_train)]
    evals, held_ids = [], []
    for i in range(round(EVAL_FRACTION * n_train)):
        template = rng.choice(EL_TEMPLATES + EL_HELD_OUT)
        evals.append(_el_item(rng, world, template, True, f"eval-{i}"))
        if template in EL_HELD_OUT:
            held_ids.append(f"eval-{i}")
    return train, evals, held_ids


def _check_args(task: str, size: int, tokens: dict[str, str] | None) -> dict[str, str]:
    if task not in TASKS:
        raise OneGenError(f"unknown synth task {task!r}; choose one of {', '.join(TASKS)}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise OneGenError(f"synth size must be an integer >= {MIN_SIZE} (entities in the world), got {size!r}")
    tokens = dict(tokens or {})
    unknown = sorted(set(tokens) - set(DEFAULT_TOKENS))
    if unknown:
        raise OneGenError(f"unknown token keys {unknown}; use {', '.join(DEFAULT_TOKENS)}")
    if not all(isinstance(v, str) and v for v in tokens.values()):
        raise OneGenError("token strings must be non-empty strings")
    return {**DEFAULT_TOKENS, **tokens}


def synth(task: str, out_dir: str | Path, seed: int = 0, size: int = 200,
          tokens: dict[str, str] | None = None) -> dict[str, Any]:
    """Generate a fictional world and write `corpus.jsonl`, `train.jsonl`, `eval.jsonl`, `world.json`.

    Args:
        task: `qa` (one retrieval per question), `multihop` (two, through a bridge entity) or `el`
            (entity-linking items, training and evaluation alike).
        out_dir: directory to write into (created if missing; files are written atomically).
        seed: the only source of randomness; equal arguments give byte-identical files.
        size: number of entities, hence of documents (>= 20).
        tokens: overrides for the `query`, `doc`, `open` and `close` token strings.

    Returns:
        `{"corpus", "train", "eval", "world"}` paths (str) and `"counts"` of rows per file.
    """
    tokens = _check_args(task, size, tokens)
    rng = random.Random(seed)
    world = build_world(rng, size)
    relations = {"qa": RELATIONS, "multihop": COMPOSITES}.get(task)
    if relations is None:
        train, evals, held_template_ids = _el_rows(rng, world)
        templates: dict[str, Any] = {"train": list(EL_TEMPLATES), "held_out": list(EL_HELD_OUT)}
    else:
        train, evals, held_template_ids = _qa_rows(rng, world, relations, tokens)
        templates = {split: {name: list(rel[i]) for name, rel in relations.items()}
                     for i, split in ((1, "train"), (2, "held_out"))}
    corpus = [{"id": e.id, "title": e.name, "text": e.text} for e in world.entities]
    out = Path(out_dir)
    result: dict[str, Any] = {"counts": {}}
    for name, rows in (("corpus", corpus), ("train", train), ("eval", evals)):
        write_jsonl_atomic(out / f"{name}.jsonl", rows)
        result[name], result["counts"][name] = str(out / f"{name}.jsonl"), len(rows)
    meta = {"task": task, "seed": seed, "size": size, "tokens": tokens, "counts": result["counts"],
            "entities": {k: len(world.of_kind(k)) for k in SLOT_KINDS.values()}, "templates": templates,
            "held_out_entities": [e.id for e in world.entities if e.id in world.held_out],
            "eval_ids_with_held_out_templates": held_template_ids}
    result["world"] = str(out / "world.json")
    write_json_atomic(result["world"], meta)
    return result
