"""Multi-step arithmetic word problems: a GSM-like reasoning task small enough to train on a laptop CPU.

A problem tracks how many objects of one kind one person holds while people buy, sell, give, take and multiply
their things. Distractor sentences move other people's things (or the same person's other things) and filler
sentences mention unrelated numbers. The worked solution has one step per relevant sentence, restating who acts and
the verb before the equation, then a final answer line (numbers LSD-first, see below):

```text
tom gets : 5 + 3 = 8 ; tom sells : 8 - 2 = 6 ; answer 6
```

so decoding involves word-level decisions (which sentence comes next, which verb and so which operation, when to
stop) as well as digits. Every number is written digit by digit, **least-significant digit first**
(`305` is `5 0 3`): tiny models learn carries far more easily that way.

Splits are disjoint by construction: a problem belongs to `train`, `validation` or `test` according to a hash of its
text, and the generator of each split keeps only the problems that hash into it.

This module is pure Python (no torch, no transformers).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


__all__ = [
    "ArithmeticProblem",
    "ArithmeticTaskConfig",
    "Event",
    "SPLITS",
    "apply_event",
    "check_answer",
    "decode_number",
    "encode_number",
    "extract_answer",
    "generate_problem",
    "generate_problems",
    "iter_problems",
    "problem_split",
    "task_words",
]

SPLITS = ("train", "validation", "test")
# Share of the hash space of each split, in thousandths: train 90 %, validation 5 %, test 5 %.
_SPLIT_BOUNDS = {"train": (0, 900), "validation": (900, 950), "test": (950, 1000)}

NAMES = (
    "tom", "ann", "sam", "mia", "ben", "eva", "leo", "zoe", "max", "ivy", "joe", "amy", "dan", "kim", "ray",
    "sue", "tim", "liz", "ian", "eve", "ned", "ada", "gus", "pam", "rob", "uma", "val", "wes", "bob", "kay",
    "lou", "meg", "nia", "otto", "paul", "rita", "sara", "theo", "vera", "yuri", "anna", "carl", "dora", "emil",
    "finn", "gina", "hugo", "iris", "jack", "lena", "mark", "nora", "omar", "pia", "rosa", "ugo",
)  # fmt: skip
OBJECTS = (
    "apples", "pears", "plums", "lemons", "marbles", "stickers", "coins", "cards", "books", "pens", "pencils",
    "eggs", "cookies", "shells", "stamps", "candies", "balloons", "beads", "toys", "rocks", "buttons", "seeds",
    "cups", "hats", "socks", "ribbons", "crayons", "nuts", "grapes", "tickets", "flowers", "leaves",
)  # fmt: skip
MULTIPLIER_WORDS = {2: "twice", 3: "three times", 4: "four times"}


@dataclass(frozen=True)
class _Template:
    """One kind of sentence: its text, the restatement used in a solution step, and what it does to whom.

    `effect` maps a role (`"a"` is the subject, `"b"` the other person) to `("+", None)`, `("-", None)` (the
    sentence's amount) or `("*", k)`.
    """

    text: str
    head: str
    effect: dict[str, tuple[str, int | None]]


# Sentences that change counts. `{a}`/`{b}` are people, `{n}` an amount, `{o}` an object.
TEMPLATES: dict[str, _Template] = {
    "buys": _Template("{a} buys {n} {o} .", "{a} buys", {"a": ("+", None)}),
    "finds": _Template("{a} finds {n} more {o} .", "{a} finds", {"a": ("+", None)}),
    "wins": _Template("{a} wins {n} {o} .", "{a} wins", {"a": ("+", None)}),
    "gets_from": _Template("{a} gets {n} {o} from {b} .", "{a} gets", {"a": ("+", None), "b": ("-", None)}),
    "takes_from": _Template(
        "{a} takes {n} {o} from {b} .", "{a} takes", {"a": ("+", None), "b": ("-", None)}
    ),
    "gives_to": _Template("{a} gives {n} {o} to {b} .", "{a} gives", {"a": ("-", None), "b": ("+", None)}),
    "gives": _Template("{a} gives {b} {n} {o} .", "{a} gives", {"a": ("-", None), "b": ("+", None)}),
    "sells": _Template("{a} sells {n} {o} .", "{a} sells", {"a": ("-", None)}),
    "loses": _Template("{a} loses {n} {o} .", "{a} loses", {"a": ("-", None)}),
    "eats": _Template("{a} uses {n} {o} .", "{a} uses", {"a": ("-", None)}),
    "doubles": _Template("{a} doubles the {o} .", "{a} doubles", {"a": ("*", 2)}),
    "triples": _Template("{a} triples the {o} .", "{a} triples", {"a": ("*", 3)}),
    "twice": _Template("{a} now has twice as many {o} .", "{a} has twice", {"a": ("*", 2)}),
    "three_times": _Template("{a} now has three times as many {o} .", "{a} has three times", {"a": ("*", 3)}),
    "four_times": _Template("{a} now has four times as many {o} .", "{a} has four times", {"a": ("*", 4)}),
}
START_TEMPLATES = ("{a} has {n} {o} .", "{a} starts with {n} {o} .", "{a} owns {n} {o} .")
FILLER_SENTENCES = (
    "it is a sunny day .",
    "the shop is very busy .",
    "everyone is happy .",
    "the park is quiet today .",
    "it rains in the evening .",
    "{a} likes to read .",
    "{a} walks to school .",
    "{a} lives near {b} .",
    "{a} is {n} years old .",
    "the bus has {n} seats .",
    "the shop opens at {n} .",
    "a box holds {n} {o} .",
    "{a} and {b} are friends .",
    "{a} sings a song .",
    "the {o} are red .",
    "the {o} cost {n} cents each .",
    "{a} has a dog .",
    "{a} plays with {b} after school .",
)
FILLER_PHRASES = (
    "then ,", "later ,", "after lunch ,", "in the morning ,", "on monday ,", "after school ,", "next ,",
    "after that ,", "at noon ,", "on friday ,", "in the evening ,", "the next day ,",
)  # fmt: skip
QUESTIONS = (
    "how many {o} does {a} have now ?",
    "how many {o} does {a} have in the end ?",
    "how many {o} does {a} have at the end of the day ?",
    "what is the number of {o} that {a} has now ?",
)
ANSWER_WORD = "answer"
SYMBOLS = (":", ";", "=", "+", "-", "*", ".", ",", "?")
DISTRACTOR_PLACEMENTS = ("before", "outside", "interleaved")

# In a relevant sentence the tracked person is the subject, so the verb alone fixes the operation.
_ADD_TEMPLATES = [(k, "a") for k, t in TEMPLATES.items() if t.effect["a"][0] == "+"]
_SUB_TEMPLATES = [(k, "a") for k, t in TEMPLATES.items() if t.effect["a"][0] == "-"]
_MUL_TEMPLATES = [(k, "a") for k, t in TEMPLATES.items() if t.effect["a"][0] == "*"]


def encode_number(value: int) -> str:
    """
    Write a non-negative integer digit by digit, least-significant digit first.

    Args:
        value (`int`):
            The number, `>= 0`.

    Returns:
        `str`: The digits separated by spaces, units first.

    Examples:

    ```python
    >>> encode_number(305)
    '5 0 3'
    >>> decode_number(encode_number(305))
    305
    ```
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`value` must be a non-negative int, got {value!r}.")
    return " ".join(reversed(str(value)))


def decode_number(text: str) -> int:
    """
    Read a number written by [`encode_number`] (space-separated digits, least-significant first).

    Args:
        text (`str`):
            Digits separated by whitespace, units first, e.g. `"5 0 3"`.

    Returns:
        `int`: The number.
    """
    digits = text.split()
    if not digits or not all(len(d) == 1 and d.isdigit() for d in digits):
        raise ValueError(f"`text` must be single digits separated by spaces (units first), got {text!r}.")
    return int("".join(reversed(digits)))


@dataclass(frozen=True)
class Event:
    """
    One sentence of a problem, in structured form.

    Args:
        kind (`str`):
            `"start"`, `"filler"` or a key of `TEMPLATES` (e.g. `"gives_to"`).
        a (`str`, *optional*):
            The subject.
        b (`str`, *optional*):
            The other person, for transfers and some fillers.
        obj (`str`, *optional*):
            The object.
        amount (`int`, *optional*):
            The amount moved (or the start count); unused by multiplications.
        text (`str`, defaults to `""`):
            The sentence as written in the problem (LSD-first numbers, filler phrase included).
    """

    kind: str
    a: str | None = None
    b: str | None = None
    obj: str | None = None
    amount: int | None = None
    text: str = ""


def apply_event(event: Event, person: str, obj: str, value: int | None) -> tuple[str, int] | None:
    """
    What an event does to `person`'s count of `obj`.

    Args:
        event (`Event`):
            The event.
        person (`str`):
            The person whose count is tracked.
        obj (`str`):
            The object tracked.
        value (`int` or `None`):
            The count before the event (unused, kept for symmetry with a simulator).

    Returns:
        `tuple[str, int]` or `None`: `(op, operand)` with `op` in `"+"`, `"-"`, `"*"`, `"="` (a start statement), or
        `None` when the event leaves the count alone.
    """
    if event.obj != obj:
        return None
    if event.kind == "start":
        return ("=", event.amount) if event.a == person else None
    if event.kind not in TEMPLATES:
        return None
    for role, (op, k) in TEMPLATES[event.kind].effect.items():
        if (event.a if role == "a" else event.b) == person:
            return (op, k if op == "*" else event.amount)
    return None


@dataclass
class ArithmeticTaskConfig:
    """
    Difficulty knobs of the arithmetic task.

    Args:
        min_operations (`int`, *optional*, defaults to `2`):
            Fewest operations on the tracked count.
        max_operations (`int`, *optional*, defaults to `4`):
            Most operations on the tracked count.
        max_value (`int`, *optional*, defaults to `999`):
            Largest number anywhere in a problem (start, amounts, intermediate results, answer).
        max_start (`int`, *optional*, defaults to `99`):
            Largest start count.
        max_amount (`int`, *optional*, defaults to `99`):
            Largest amount added or removed in one step.
        min_distractors (`int`, *optional*, defaults to `1`):
            Fewest distractor sentences (other people's or other objects' changes and starts).
        max_distractors (`int`, *optional*, defaults to `2`):
            Most distractor sentences.
        max_fillers (`int`, *optional*, defaults to `1`):
            Most filler sentences (no effect on any count).
        filler_phrase_probability (`float`, *optional*, defaults to `0.15`):
            Probability that a sentence after the first starts with a filler phrase such as "after lunch ,".
        multiply_probability (`float`, *optional*, defaults to `0.25`):
            Probability that an operation is a multiplication (when the result stays within `max_value`).
        distractor_placement (`str`, *optional*, defaults to `"before"`):
            Where distractor and filler sentences go: `"before"` the start sentence (the relevant sentences then run
            up to the question), `"outside"` the run of relevant sentences (before or after it; the solver must then
            also decide when to stop), or `"interleaved"` anywhere (the hardest).
    """

    min_operations: int = field(default=2, metadata={"help": "Fewest operations on the tracked count."})
    max_operations: int = field(default=4, metadata={"help": "Most operations on the tracked count."})
    max_value: int = field(default=999, metadata={"help": "Largest number anywhere in a problem."})
    max_start: int = field(default=99, metadata={"help": "Largest start count."})
    max_amount: int = field(default=99, metadata={"help": "Largest amount added or removed in one step."})
    min_distractors: int = field(default=1, metadata={"help": "Fewest distractor sentences."})
    max_distractors: int = field(default=2, metadata={"help": "Most distractor sentences."})
    max_fillers: int = field(default=1, metadata={"help": "Most filler sentences."})
    filler_phrase_probability: float = field(
        default=0.15, metadata={"help": "Probability of a filler phrase before a sentence."}
    )
    multiply_probability: float = field(default=0.25, metadata={"help": "Probability of a multiplication step."})
    distractor_placement: str = field(
        default="before",
        metadata={
            "help": "Where distractor and filler sentences go: `before` the start sentence (the relevant sentences "
            "then run up to the question), `outside` the run of relevant sentences (before or after it), or "
            "`interleaved` anywhere."
        },
    )

    def __post_init__(self) -> None:
        if not 1 <= self.min_operations <= self.max_operations:
            raise ValueError(
                f"`min_operations` and `max_operations` must satisfy 1 <= min <= max, got {self.min_operations} and "
                f"{self.max_operations}."
            )
        if self.max_value < 9:
            raise ValueError(f"`max_value` must be at least 9, got {self.max_value}.")
        for name in ("max_start", "max_amount"):
            value = getattr(self, name)
            if not 1 <= value <= self.max_value:
                raise ValueError(f"`{name}` must be in [1, max_value={self.max_value}], got {value}.")
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError(
                f"`min_distractors` and `max_distractors` must satisfy 0 <= min <= max, got {self.min_distractors} "
                f"and {self.max_distractors}."
            )
        if self.distractor_placement not in DISTRACTOR_PLACEMENTS:
            raise ValueError(
                f"`distractor_placement` must be one of {DISTRACTOR_PLACEMENTS}, got {self.distractor_placement!r}."
            )
        if self.max_fillers < 0:
            raise ValueError(f"`max_fillers` must be >= 0, got {self.max_fillers}.")
        for name in ("filler_phrase_probability", "multiply_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")

    def to_dict(self) -> dict:
        """Return the settings as a JSON-serialisable dict."""
        return asdict(self)

    @property
    def max_solution_words(self) -> int:
        """An upper bound on the number of words (tokens) of a solution, end-of-sequence excluded."""
        digits = len(str(self.max_value))
        step = 4 + 1 + 3 * digits + 3 + 1  # head (<= 4 words), ":", x op b = y, ";"
        return self.max_operations * step + 1 + digits


@dataclass(frozen=True)
class ArithmeticProblem:
    """
    One problem with its worked solution.

    Args:
        text (`str`):
            The problem, words separated by single spaces, numbers LSD-first.
        solution (`str`):
            The worked solution: one `head : x op b = y ;` step per operation, then `answer y`.
        answer (`int`):
            The final count.
        person (`str`):
            The person asked about.
        obj (`str`):
            The object asked about.
        events (`tuple[Event, ...]`):
            The sentences in structured form, in text order (the question excluded).
        split (`str`):
            The split the text hashes into.
    """

    text: str
    solution: str
    answer: int
    person: str
    obj: str
    events: tuple[Event, ...]
    split: str

    @property
    def messages(self) -> list[dict[str, str]]:
        """The problem as a one-turn chat, for `tokenizer.apply_chat_template`."""
        return [{"role": "user", "content": self.text}]

    def to_dict(self) -> dict:
        """A flat, JSON-serialisable view (`text`, `solution`, `answer`, `person`, `obj`, `split`)."""
        return {
            "text": self.text,
            "solution": self.solution,
            "answer": self.answer,
            "person": self.person,
            "obj": self.obj,
            "split": self.split,
        }


def problem_split(text: str) -> str:
    """
    The split a problem text belongs to, from a hash of the text (train 90 %, validation 5 %, test 5 %).

    Args:
        text (`str`):
            The problem text.

    Returns:
        `str`: `"train"`, `"validation"` or `"test"`.
    """
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") % 1000
    for split, (low, high) in _SPLIT_BOUNDS.items():
        if low <= bucket < high:
            return split
    raise AssertionError("unreachable")


def _fill(template: str, a: str | None = None, b: str | None = None, n: int | None = None, o: str | None = None):
    return template.format(a=a, b=b, n=encode_number(n) if n is not None else None, o=o)


def _other(rng: random.Random, exclude: set[str], pool: tuple[str, ...]) -> str:
    while True:
        choice = rng.choice(pool)
        if choice not in exclude:
            return choice


def _draw_operation(rng: random.Random, value: int, config: ArithmeticTaskConfig) -> tuple[str, int]:
    """Pick `(op, operand)` keeping the result in [0, max_value]."""
    kinds = []
    if value < config.max_value:
        kinds.append("+")
    if value > 0:
        kinds.append("-")
    multipliers = [k for k in MULTIPLIER_WORDS if value * k <= config.max_value and value > 0]
    if multipliers and rng.random() < config.multiply_probability:
        return "*", rng.choice(multipliers)
    op = rng.choice(kinds)
    if op == "+":
        return "+", rng.randint(1, min(config.max_amount, config.max_value - value))
    return "-", rng.randint(1, min(config.max_amount, value))


def _relevant_event(rng: random.Random, person: str, obj: str, op: str, operand: int, people: list[str]) -> Event:
    pool = {"+": _ADD_TEMPLATES, "-": _SUB_TEMPLATES, "*": _MUL_TEMPLATES}[op]
    if op == "*":
        pool = [(k, r) for k, r in pool if TEMPLATES[k].effect[r][1] == operand]
    kind, role = rng.choice(pool)
    template = TEMPLATES[kind]
    other = _other(rng, {person}, tuple(people))
    a, b = (person, other) if role == "a" else (other, person)
    if "{b}" not in template.text:
        b = None
    amount = None if op == "*" else operand
    return Event(kind, a=a, b=b, obj=obj, amount=amount, text=_fill(template.text, a, b, amount, obj))


def _distractor_event(rng: random.Random, person: str, obj: str, people: list[str], config) -> Event:
    """A start or change that leaves `person`'s count of `obj` alone."""
    while True:
        if rng.random() < 0.5:
            other_obj = _other(rng, {obj}, OBJECTS)
            cast = [person, *people]
        else:
            other_obj = obj
            cast = [p for p in people if p != person]
        a = rng.choice(cast)
        b = _other(rng, {a}, tuple(cast)) if len(cast) > 1 else _other(rng, {a, person}, NAMES)
        if rng.random() < 0.25:
            amount = rng.randint(1, config.max_start)
            text = _fill(rng.choice(START_TEMPLATES), a, None, amount, other_obj)
            event = Event("start", a=a, obj=other_obj, amount=amount, text=text)
        else:
            kind = rng.choice(list(TEMPLATES))
            template = TEMPLATES[kind]
            if "{b}" not in template.text:
                b = None
            amount = None if "{n}" not in template.text else rng.randint(1, config.max_amount)
            text = _fill(template.text, a, b, amount, other_obj)
            event = Event(kind, a=a, b=b, obj=other_obj, amount=amount, text=text)
        if apply_event(event, person, obj, None) is None:
            return event


def _filler_event(rng: random.Random, people: list[str], config: ArithmeticTaskConfig) -> Event:
    template = rng.choice(FILLER_SENTENCES)
    a = rng.choice(people)
    b = _other(rng, {a}, tuple(people))
    n = rng.randint(1, config.max_value) if "{n}" in template else None
    o = rng.choice(OBJECTS)
    return Event("filler", text=_fill(template, a, b, n, o))


def generate_problem(rng: random.Random, config: ArithmeticTaskConfig | None = None) -> ArithmeticProblem:
    """
    Draw one problem (any split; see [`generate_problems`] for split-aware generation).

    Args:
        rng (`random.Random`):
            The random source; the same state gives the same problem.
        config (`ArithmeticTaskConfig`, *optional*):
            Difficulty knobs; defaults to `ArithmeticTaskConfig()`.

    Returns:
        [`ArithmeticProblem`]: The problem, its solution and answer.
    """
    config = config or ArithmeticTaskConfig()
    person = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    people = [person] + rng.sample([n for n in NAMES if n != person], 3)

    value = rng.randint(1, config.max_start)
    start_text = _fill(rng.choice(START_TEMPLATES), person, None, value, obj)
    start = Event("start", a=person, obj=obj, amount=value, text=start_text)
    relevant = [start]
    steps = []
    for _ in range(rng.randint(config.min_operations, config.max_operations)):
        op, operand = _draw_operation(rng, value, config)
        event = _relevant_event(rng, person, obj, op, operand, people)
        new_value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        head = _fill(TEMPLATES[event.kind].head, event.a, event.b, event.amount, obj)
        steps.append(f"{head} : {encode_number(value)} {op} {encode_number(operand)} = {encode_number(new_value)} ;")
        relevant.append(event)
        value = new_value

    num_distractors = rng.randint(config.min_distractors, config.max_distractors)
    others = [_distractor_event(rng, person, obj, people, config) for _ in range(num_distractors)]
    others += [_filler_event(rng, people, config) for _ in range(rng.randint(0, config.max_fillers))]
    if config.distractor_placement == "interleaved":  # relevant events keep their order, the others go anywhere
        order = ["r"] * len(relevant) + ["o"] * len(others)
        rng.shuffle(order)
        events, r, o = [], iter(relevant), iter(others)
        for tag in order:
            events.append(next(r) if tag == "r" else next(o))
    else:  # the relevant sentences in one run; distractors and fillers before (or after) it
        rng.shuffle(others)
        cut = len(others) if config.distractor_placement == "before" else rng.randint(0, len(others))
        events = [*others[:cut], *relevant, *others[cut:]]
    sentences = []
    for i, event in enumerate(events):
        sentence = event.text
        if i > 0 and rng.random() < config.filler_phrase_probability:
            sentence = f"{rng.choice(FILLER_PHRASES)} {sentence}"
        sentences.append(sentence)
    events = [Event(e.kind, e.a, e.b, e.obj, e.amount, s) for e, s in zip(events, sentences)]
    question = rng.choice(QUESTIONS).format(a=person, o=obj)
    text = " ".join([*sentences, question])
    solution = " ".join([*steps, ANSWER_WORD, encode_number(value)])
    return ArithmeticProblem(
        text=text,
        solution=solution,
        answer=value,
        person=person,
        obj=obj,
        events=tuple(events),
        split=problem_split(text),
    )


def _split_rng(split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    return random.Random(f"s2t_hf/arithmetic/{split}/{seed}")


def iter_problems(
    split: str = "train", seed: int = 0, config: ArithmeticTaskConfig | None = None
) -> Iterator[ArithmeticProblem]:
    """
    An endless, deterministic stream of problems of one split.

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            `"train"`, `"validation"` or `"test"`; only problems whose text hashes into it are kept, so splits never
            share a problem.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the stream.
        config (`ArithmeticTaskConfig`, *optional*):
            Difficulty knobs.

    Returns:
        `Iterator[ArithmeticProblem]`
    """
    rng = _split_rng(split, seed)
    config = config or ArithmeticTaskConfig()
    while True:
        problem = generate_problem(rng, config)
        if problem.split == split:
            yield problem


def generate_problems(
    num_problems: int, split: str = "validation", seed: int = 0, config: ArithmeticTaskConfig | None = None
) -> list[ArithmeticProblem]:
    """
    A deterministic list of distinct problems of one split.

    Args:
        num_problems (`int`):
            How many problems.
        split (`str`, *optional*, defaults to `"validation"`):
            `"train"`, `"validation"` or `"test"`.
        seed (`int`, *optional*, defaults to `0`):
            Seed; the same `(split, seed, config)` always gives the same list, and a longer list extends a shorter one.
        config (`ArithmeticTaskConfig`, *optional*):
            Difficulty knobs.

    Returns:
        `list[ArithmeticProblem]`

    Examples:

    ```python
    >>> from s2t_hf.tasks import generate_problems, check_answer
    >>> problem = generate_problems(1, split="test", seed=0)[0]
    >>> check_answer(problem.solution, problem.answer)
    True
    ```
    """
    if not isinstance(num_problems, int) or num_problems < 0:
        raise ValueError(f"`num_problems` must be a non-negative int, got {num_problems!r}.")
    problems, seen = [], set()
    for problem in iter_problems(split, seed, config):
        if len(problems) >= num_problems:
            break
        if problem.text not in seen:
            seen.add(problem.text)
            problems.append(problem)
    return problems


def extract_answer(text: str) -> int | None:
    """
    Read the final answer of a solution: the LSD-first digits after the first `answer` word.

    Args:
        text (`str`):
            A completion (special tokens such as `<eos>` may follow the digits).

    Returns:
        `int` or `None`: The answer, or `None` when there is no `answer` word followed by at least one digit.

    Examples:

    ```python
    >>> extract_answer("tom buys : 5 + 2 = 7 ; answer 7")
    7
    >>> extract_answer("answer 5 0 3 <eos>")
    305
    >>> extract_answer("tom buys") is None
    True
    ```
    """
    words = text.split()
    if ANSWER_WORD not in words:
        return None
    digits = []
    for word in words[words.index(ANSWER_WORD) + 1 :]:
        if len(word) != 1 or not word.isdigit() or len(digits) >= 6:
            break
        digits.append(word)
    return int("".join(reversed(digits))) if digits else None


def check_answer(completion: str, answer: int) -> bool:
    """
    Whether a completion's final answer (see [`extract_answer`]) equals `answer`.

    Args:
        completion (`str`):
            The generated solution.
        answer (`int`):
            The correct answer.

    Returns:
        `bool`
    """
    return extract_answer(completion) == answer


def task_words() -> list[str]:
    """
    Every word a problem or solution of this task can contain (digits and symbols included), sorted.

    Returns:
        `list[str]`
    """
    texts = [t.text + " " + t.head for t in TEMPLATES.values()]
    texts += [*START_TEMPLATES, *FILLER_SENTENCES, *FILLER_PHRASES, *QUESTIONS, *MULTIPLIER_WORDS.values()]
    words = {w for text in texts for w in text.split() if not w.startswith("{")}
    words |= set(NAMES) | set(OBJECTS) | set(SYMBOLS) | {str(d) for d in range(10)} | {ANSWER_WORD}
    return sorted(words)
