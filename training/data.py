"""The synthetic corpus behind the bundled model: graded arithmetic and invented facts.

Tasks (difficulty in brackets):

    add, sub  [1-4]   two operands of d digits: "What is 123+456?" -> "579"
    mul       [1-4]   a d-digit number times a 1-digit number
    expr      [2-4]   d operators over 1-digit numbers, usual precedence: "3+4*2" -> "11"
    fact      [1]     a table of invented countries, recalled by question:
                      "What is the capital of Veltria?" -> "Morvash"

A *problem* is what is asked; a *rendering* is how it is written (chat or plain completion,
phrasing, spacing). Splits are assigned per problem, so train, validation and test never
share one, whatever the rendering:

- arithmetic: a stable hash of the canonical problem (a+b and b+a are one problem) picks
  the split (5% test, 5% validation);
- facts: the fact itself must be learned, so what is held out is the *question*: of the ten
  phrasings of each fact, one is test-only and one validation-only (a seeded choice per
  fact). Test fact recall therefore asks every fact in a phrasing never trained for it.

Formats (byte tokenizer ids, see engine/tokenizer.py):

    chat:  <bos><|user|>{question}<eos><|assistant|>{answer}<eos>
    plain: <bos>{a}{op}{b}=  -> {answer}<eos>          (arithmetic)
           <bos>Q: {question}\\nA:  -> " {answer}"<eos>  (facts)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Iterator

from model.tokenizer import ByteTokenizer

SPLITS = ("train", "val", "test")
ARITHMETIC = ("add", "sub", "mul", "expr")
TASKS = (*ARITHMETIC, "fact")
DIFFICULTIES = {"add": (1, 2, 3, 4), "sub": (1, 2, 3, 4), "mul": (1, 2, 3, 4),
                "expr": (2, 3, 4), "fact": (1,)}
FORMATS = ("chat", "plain")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
ARITHMETIC_QUESTIONS = ("What is {}?", "Compute {}.", "Calculate {}.")
# each phrasing names the relation's keyword so that the fact is recoverable from any of them
FACT_QUESTIONS = {
    "capital": ("What is the capital of {}?", "Which city is the capital of {}?",
                "Name the capital of {}.", "Tell me the capital of {}.",
                "What city is {}'s capital?", "The capital of {} is which city?",
                "What's the capital city of {}?", "Do you know the capital of {}?",
                "{} has which city as its capital?", "Give the capital of {}."),
    "currency": ("What is the currency of {}?", "Which currency is used in {}?",
                 "Name the currency of {}.", "Tell me the currency of {}.",
                 "What currency does {} use?", "The currency of {} is called what?",
                 "What's the currency in {}?", "Do you know the currency of {}?",
                 "{} pays with which currency?", "Give the currency of {}."),
    "river": ("What is the longest river in {}?", "Which river is the longest in {}?",
              "Name the longest river in {}.", "Tell me the longest river in {}.",
              "What river is {}'s longest?", "The longest river in {} is which one?",
              "What's the longest river of {}?", "Do you know the longest river in {}?",
              "{} has which river as its longest?", "Give the longest river in {}."),
}
RELATIONS = tuple(FACT_QUESTIONS)
# Training-only question frames (`--extra-phrasings`): the country early, late and in the
# middle, so that no held-out phrasing is new in kind. None is one of the ten above, and
# none uses their lead words ("tell me", "name", "give", "do you know", "what's"); a few are
# near them ("Say the ..." / "Give the ...", "What would be the ..." / "What is the ..."),
# so for some facts the held-out question has a close cousin in training, never a copy.
# {rel} is the relation's noun, {c} the country.
EXTRA_FRAMES = (
    "{c}: what is its {rel}?", "For {c}, what is the {rel}?", "In {c}, which is the {rel}?",
    "{c} - {rel}?", "About {c}: its {rel}?", "Country: {c}. Its {rel}?",
    "{c}'s {rel} is what?", "Regarding {c}, which is the {rel}?",
    "If you visit {c}, what is the {rel}?", "{c}. Which {rel}?",
    "I wonder what the {rel} of {c} is.", "Quick question: the {rel} of {c}?",
    "Which is the {rel} for {c}?", "Who knows the {rel} of {c}?", "Question: {rel} of {c}?",
    "Remind me of the {rel} of {c}.", "What would be the {rel} of {c}?",
    "Say the {rel} of {c}.", "The {rel}, {c}?", "Looking at {c}, its {rel} is?")
RELATION_NOUNS = {"capital": "capital", "currency": "currency", "river": "longest river"}
EXTRA_QUESTIONS = {r: tuple(f.replace("{rel}", noun).replace("{c}", "{}") for f in EXTRA_FRAMES)
                   for r, noun in RELATION_NOUNS.items()}
TEST_PERCENT, VAL_PERCENT = 5, 5


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question with its answer; `key` identifies it across renderings."""

    task: str
    difficulty: int
    key: str
    answer: str
    operands: tuple[str, ...] = ()  # arithmetic: the expression's pieces; fact: (entity,)
    phrasing: int = 0  # facts: index into fact_questions(relation, extra=True)
    relation: str = ""


@dataclasses.dataclass(frozen=True)
class Example:
    """A rendered problem: ids = prompt + answer + eos; the answer starts at `prompt_len`."""

    problem: Problem
    format: str
    ids: tuple[int, ...]
    prompt_len: int

    @property
    def prompt(self) -> list[int]:
        return list(self.ids[:self.prompt_len])

    @property
    def answer_ids(self) -> list[int]:
        return list(self.ids[self.prompt_len:])


# ---------------------------------------------------------------------- arithmetic
def split_of_key(key: str, seed: int) -> str:
    """Stable split of a canonical problem key (independent of Python's hash seed)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "val" if bucket < TEST_PERCENT + VAL_PERCENT else "train"


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0-9 for one digit)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randrange(low, 10 ** digits)


def binary_problem(task: str, difficulty: int, rng: random.Random) -> Problem:
    """add / sub: two d-digit operands; mul: a d-digit number times a 1-digit number."""
    a = _number(rng, difficulty)
    b = _number(rng, 1 if task == "mul" else difficulty)
    value = {"add": a + b, "sub": a - b, "mul": a * b}[task]
    return Problem(task, difficulty, canonical_key(task, a, b), str(value),
                   operands=(str(a), SYMBOL[task], str(b)))


def canonical_key(task: str, a: int, b: int) -> str:
    """a+b and b+a (a*b and b*a) are one problem; a-b and b-a are two."""
    lo, hi = (min(a, b), max(a, b)) if task != "sub" else (a, b)
    return f"{lo}{SYMBOL[task]}{hi}"


def expr_problem(difficulty: int, rng: random.Random) -> Problem:
    """`difficulty` operators (+, -, *) over 1-digit numbers, evaluated with precedence."""
    pieces = [str(rng.randrange(10))]
    for _ in range(difficulty):
        pieces += [rng.choice("+-*"), str(rng.randrange(10))]
    text = "".join(pieces)
    return Problem("expr", difficulty, text, str(eval_expression(pieces)), operands=tuple(pieces))


def eval_expression(pieces: list[str]) -> int:
    """Evaluate [n, op, n, op, ...] of integers with * before + and -."""
    terms, signs = [int(pieces[0])], []
    for op, num in zip(pieces[1::2], pieces[2::2], strict=True):
        if op == "*":
            terms[-1] *= int(num)
        else:
            signs.append(op)
            terms.append(int(num))
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        total = total + term if sign == "+" else total - term
    return total


def arithmetic_problem(task: str, difficulty: int, rng: random.Random) -> Problem:
    if task == "expr":
        return expr_problem(difficulty, rng)
    return binary_problem(task, difficulty, rng)


# ---------------------------------------------------------------------- facts
ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
          "th", "v", "z")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
CODAS = ("", "", "n", "r", "s", "l", "sh", "th", "x")
ENDINGS = {"country": ("ria", "nia", "land", "stan", "via", "dor", "mark"),
           "capital": ("", "ton", "burg", "grad", "holm", "vash", "ford"),
           "currency": ("", "", "", "o", "a"),
           "river": ("", "a", "e")}


def invented_word(rng: random.Random, kind: str) -> str:
    """A pronounceable invented name: one or two syllables plus a kind-specific ending."""
    syllables = rng.randint(1, 2)
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables))
    return (word + rng.choice(ENDINGS[kind])).capitalize()


@dataclasses.dataclass(frozen=True)
class World:
    """The invented fact table: facts[country][relation] = answer; all names distinct."""

    countries: tuple[str, ...]
    facts: dict[str, dict[str, str]]

    @classmethod
    def build(cls, seed: int, num_countries: int) -> World:
        rng = random.Random(f"world:{seed}")
        used: set[str] = set()
        countries = tuple(_fresh_name(rng, "country", used) for _ in range(num_countries))
        facts = {c: {r: _fresh_name(rng, _answer_kind(r), used) for r in RELATIONS}
                 for c in countries}
        return cls(countries, facts)


def _answer_kind(relation: str) -> str:
    return {"capital": "capital", "currency": "currency", "river": "river"}[relation]


def _fresh_name(rng: random.Random, kind: str, used: set[str]) -> str:
    """A name of 4-9 letters that no other name starts with or is a prefix of (so recall is
    unambiguous)."""
    while True:
        name = invented_word(rng, kind)
        clash = any(name.startswith(u) or u.startswith(name) for u in used)
        if 4 <= len(name) <= 9 and not clash:
            used.add(name)
            return name


def fact_phrasing_split(country: str, relation: str, seed: int) -> dict[int, str]:
    """Which phrasing of this fact belongs to which split: one test, one val, the rest train."""
    order = list(range(len(FACT_QUESTIONS[relation])))
    random.Random(f"phrasing:{seed}:{country}:{relation}").shuffle(order)
    return {p: ("test" if i == 0 else "val" if i == 1 else "train") for i, p in enumerate(order)}


def fact_questions(relation: str, extra: bool) -> tuple[str, ...]:
    """The question templates of a relation: the ten of every split, then (with `extra`) the
    training-only frames, whose indices start at 10 and are always in the train split."""
    return FACT_QUESTIONS[relation] + (EXTRA_QUESTIONS[relation] if extra else ())


def fact_problem(world: World, country: str, relation: str, phrasing: int) -> Problem:
    return Problem("fact", 1, f"{relation}:{country}:{phrasing}", world.facts[country][relation],
                   operands=(country,), phrasing=phrasing, relation=relation)


# ---------------------------------------------------------------------- rendering
def render(problem: Problem, fmt: str, rng: random.Random, tokenizer: ByteTokenizer) -> Example:
    """Write a problem in chat or plain format; arithmetic spacing and wording vary by rng."""
    if problem.task == "fact":
        templates = fact_questions(problem.relation, extra=True)
        question = templates[problem.phrasing].format(problem.operands[0])
        plain, plain_answer = f"Q: {question}\nA:", f" {problem.answer}"
    else:
        joiner = " " if rng.random() < 0.3 else ""
        expression = joiner.join(problem.operands)
        question = rng.choice(ARITHMETIC_QUESTIONS).format(expression)
        plain, plain_answer = f"{expression}=", problem.answer
    if fmt == "chat":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        answer = tokenizer.encode(problem.answer)
    else:
        prompt, answer = tokenizer.encode(plain, add_bos=True), tokenizer.encode(plain_answer)
    ids = (*prompt, *answer, tokenizer.eos_token_id)
    return Example(problem, fmt, ids, len(prompt))


# ---------------------------------------------------------------------- the corpus
@dataclasses.dataclass(frozen=True)
class Mixture:
    """How often each task and each difficulty is drawn for training."""

    task_weights: tuple[tuple[str, float], ...] = (
        ("add", 0.40), ("sub", 0.10), ("mul", 0.10), ("expr", 0.05), ("fact", 0.35))
    difficulty_weights: tuple[float, ...] = (0.1, 0.35, 0.4, 0.15)  # digits 1..4
    chat_fraction: float = 0.5

    @classmethod
    def parse(cls, text: str) -> Mixture:
        """`add=0.35,sub=0.2,...`: task weights (every task named once, any positive scale)."""
        weights: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            task, sep, value = item.partition("=")
            if not sep or task not in TASKS or task in weights:
                raise ValueError(f"a task mix is TASK=WEIGHT pairs, each of {', '.join(TASKS)} "
                                 f"once; got {item!r} in {text!r}")
            try:
                weights[task] = float(value)
            except ValueError:
                raise ValueError(f"task weight must be a number, got {item!r}") from None
            if not (weights[task] >= 0 and math.isfinite(weights[task])):
                raise ValueError(f"task weight must be a finite number >= 0, got {item!r}")
        if set(weights) != set(TASKS) or sum(weights.values()) <= 0:
            raise ValueError(f"a task mix names every task ({', '.join(TASKS)}) with weights "
                             f"summing to more than 0; got {text!r}")
        total = sum(weights.values())
        return cls(task_weights=tuple((t, weights[t] / total) for t in TASKS))

    def describe(self) -> str:
        """The inverse of `parse` (normalised weights)."""
        return ",".join(f"{t}={w:g}" for t, w in self.task_weights)


class Corpus:
    """Seeded problem source for every split; the same seed gives the same corpus."""

    def __init__(self, seed: int = 0, num_countries: int = 32, mixture: Mixture | None = None,
                 extra_phrasings: bool = False) -> None:
        self.seed = seed
        self.extra_phrasings = extra_phrasings  # training also asks in EXTRA_QUESTIONS
        self.world = World.build(seed, num_countries)
        self.mixture = mixture or Mixture()
        self.tokenizer = ByteTokenizer()
        self._fact_splits = {(c, r): fact_phrasing_split(c, r, seed)
                             for c in self.world.countries for r in RELATIONS}

    def split_of(self, problem: Problem) -> str:
        if problem.task == "fact":
            if problem.phrasing >= len(FACT_QUESTIONS[problem.relation]):
                return "train"  # an EXTRA_QUESTIONS frame
            return self._fact_splits[(problem.operands[0], problem.relation)][problem.phrasing]
        return split_of_key(problem.key, self.seed)

    def draw_problem(self, split: str, task: str, difficulty: int, rng: random.Random
                     ) -> Problem:
        """A random problem of this task and difficulty that belongs to `split`."""
        for _ in range(10_000):
            problem = self._random_problem(task, difficulty, rng)
            if self.split_of(problem) == split:
                return problem
        raise RuntimeError(f"no {split} problem found for {task} difficulty {difficulty}")

    def _random_problem(self, task: str, difficulty: int, rng: random.Random) -> Problem:
        if task != "fact":
            return arithmetic_problem(task, difficulty, rng)
        country, relation = rng.choice(self.world.countries), rng.choice(RELATIONS)
        count = len(fact_questions(relation, self.extra_phrasings))
        return fact_problem(self.world, country, relation, rng.randrange(count))

    def sample(self, split: str, rng: random.Random) -> Example:
        """One training-style example of `split`, task and difficulty drawn by the mixture."""
        tasks, weights = zip(*self.mixture.task_weights, strict=True)
        task = rng.choices(tasks, weights)[0]
        levels = DIFFICULTIES[task]
        level_weights = self.mixture.difficulty_weights[-len(levels):]
        difficulty = rng.choices(levels, level_weights)[0]
        problem = self.draw_problem(split, task, difficulty, rng)
        fmt = "chat" if rng.random() < self.mixture.chat_fraction else "plain"
        return render(problem, fmt, rng, self.tokenizer)

    def stream(self, split: str, rng: random.Random) -> Iterator[Example]:
        while True:
            yield self.sample(split, rng)

    def held_out(self, split: str, per_cell: int, seed: int = 1) -> list[Example]:
        """A fixed evaluation set: up to `per_cell` distinct problems per (task, difficulty),
        each rendered in both formats; facts: every fact in its `split` phrasing (all of them)."""
        rng = random.Random(f"held-out:{self.seed}:{split}:{seed}")
        problems = self._fact_problems(split)
        for task in ARITHMETIC:
            for difficulty in DIFFICULTIES[task]:
                problems += self._distinct_problems(split, task, difficulty, per_cell, rng)
        return [render(p, fmt, rng, self.tokenizer) for p in problems for fmt in FORMATS]

    def _fact_problems(self, split: str) -> list[Problem]:
        return [fact_problem(self.world, c, r, p)
                for (c, r), phrasings in self._fact_splits.items()
                for p, s in phrasings.items() if s == split]

    def _distinct_problems(self, split: str, task: str, difficulty: int, limit: int,
                           rng: random.Random) -> list[Problem]:
        found: dict[str, Problem] = {}
        for _ in range(limit * 40):
            problem = self._random_problem(task, difficulty, rng)
            if self.split_of(problem) == split:
                found.setdefault(problem.key, problem)
                if len(found) == limit:
                    break
        return list(found.values())
