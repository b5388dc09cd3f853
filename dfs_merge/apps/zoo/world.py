"""The zoo's invented world: two languages, E and J, and arithmetic word problems. Standard library only.

Every sentence is generated from one meaning (a frame), rendered in E or in J:

- **E** writes every number with digits: ``tom finds 3 apples .``
- **J** has its own words for names, nouns, verbs, adjectives and function words, a subject
  particle (``ga``), a topic particle (``wa``), its own punctuation (``。`` ``？``), and its
  own number words for 0-12 (larger numbers in digits, as Japanese mixes kanji numerals and
  Arabic ones): ``tomu ga mitsukeru san ringo 。``. Word order is E's (a simplification).

Text kinds (the only things any model is trained on):

- ``e_story``: E narratives. Numbers appear, and counting (``tom counts 4 5 6 7 .``), but never
  a total that follows from earlier numbers: no word problem and no sum is in them.
- ``j_story``: the same kind of narratives in J.
- ``parallel``: an E story and its J rendering (either order), joined by `` = ``.
- ``mixed``: code-switched stories: each sentence in E or J, content words and numbers
  switched to the other language with some probability.
- ``e_arith``: E word problems with their answer, ``... how many apples does tom have now ? answer : 8``.

Targets and held-out splits:

- ``j_arith`` (the target): the J rendering of a word problem; its operands are J number
  words, its answer digits (``kotae : 8``). **No model is trained on any J problem.**
- ``e_arith`` dev/test: E problems held out from M's training.
- ``j_text`` dev/test: J stories held out from J's training, for the J language-model loss.

Determinism: everything comes from `random.Random(seed)`; the same seed gives the same text.
Disjointness is by construction (each split has its own seed) and enforced by filtering
(`make_splits` removes every held-out item, and the E rendering of every J problem, from
the training streams) and checked by the tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

# ---------------------------------------------------------------------------- lexicon (E -> J)

NAMES = {
    "tom": "tomu", "mary": "mari", "ann": "anu", "bob": "bobu", "sam": "samu", "lucy": "rushi",
    "jack": "jaku", "emma": "ema", "ben": "benu", "lily": "riri", "max": "makusu", "rose": "rozu",
}
OBJECTS = {
    "apples": "ringo", "pears": "nashi", "eggs": "tamago", "books": "hon", "coins": "koin",
    "cups": "kappu", "pens": "pen", "stones": "ishi", "shells": "kai", "cards": "kado",
    "plums": "sumomo", "nuts": "kurumi",
}
ADD_VERBS = {"finds": "mitsukeru", "buys": "kau", "gets": "morau", "picks": "tsumu"}
SUB_VERBS = {"loses": "nakusu", "sells": "uru", "eats": "taberu", "drops": "otosu"}
ADJECTIVES = {
    "red": "akai", "big": "ookii", "small": "chiisai", "old": "furui", "new": "atarashii",
    "happy": "ureshii", "sad": "kanashii", "tired": "nemui",
}
PLACES = {"park": "kouen", "market": "ichiba", "school": "gakkou", "river": "kawa", "home": "ie", "shop": "mise"}
OTHER = {
    "has": "motsu", "gives": "ageru", "likes": "suki", "sees": "miru", "goes": "iku", "wants": "hoshii",
    "counts": "kazoeru", "how": "dore", "many": "ikutsu", "now": "ima", "and": "oyobi", "then": "sorekara",
    "answer": "kotae", "today": "kyou", "says": "iu",
}
J_NUMBER_WORDS = ["rei", "ichi", "ni", "san", "yon", "go", "roku", "nana", "hachi", "kyuu", "juu", "juuichi", "juuni"]
E_ONLY = ["the", "to", "does", "have", "is", "are", ".", "?"]
J_ONLY = ["ga", "wa", "wo", "he", "desu", "。", "？"]
SHARED = [":", "="]
MAX_NUMBER = 99  # number tokens "0".."99"

CONTENT = {**NAMES, **OBJECTS, **ADD_VERBS, **SUB_VERBS, **ADJECTIVES, **PLACES, **OTHER}

SPECIALS = ["<pad>", "<unk>", "<eos>"]


def j_words() -> list[str]:
    """The tokens that only J uses."""
    return list(dict.fromkeys([*CONTENT.values(), *J_NUMBER_WORDS, *J_ONLY]))


def vocabulary() -> list[str]:
    """All tokens, in a fixed order (the token id is the index)."""
    words = list(SPECIALS) + [str(n) for n in range(MAX_NUMBER + 1)]
    for e, j in CONTENT.items():
        words += [e, j]
    words += J_NUMBER_WORDS + E_ONLY + J_ONLY + SHARED
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------------------- rendering

# Problem operands: a, b in 0..12 (J writes them as words); add: a + b; sub: a - b with b <= a.
OPERAND_MAX = 12


def num(n: int, lang: str) -> str:
    """A number as E (digits), J (a word for 0-12, digits above) or J with digits (`jd`, as MGSM-JA writes
    its numbers: Arabic digits in Japanese text) writes it."""
    if lang == "j" and 0 <= n < len(J_NUMBER_WORDS):
        return J_NUMBER_WORDS[n]
    return str(n)


@dataclass(frozen=True)
class Problem:
    """One word problem: `name` has `a` `obj`; then `verb` `b` of them. Answer: the count now."""

    name: str
    obj: str
    verb: str
    a: int
    b: int

    @property
    def op(self) -> str:
        return "add" if self.verb in ADD_VERBS else "sub"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "add" else self.a - self.b

    def question(self, lang: str) -> str:
        """The problem text up to and including the answer cue (``answer :`` / ``kotae :``); `lang` is e, j
        or jd (J's words with digit operands)."""
        s = [("has", self.a), (self.verb, self.b)]
        return " ".join(_sentence(self.name, v, n, self.obj, lang) for v, n in s) + " " + _ask(self.name, self.obj, lang)

    def text(self, lang: str) -> str:
        return f"{self.question(lang)} {self.answer}"


def _sentence(name: str, verb: str, n: int, obj: str, lang: str) -> str:
    if lang == "e":
        return f"{name} {verb} {num(n, 'e')} {obj} ."
    return f"{NAMES[name]} ga {CONTENT[verb]} {num(n, lang)} {OBJECTS[obj]} 。"


def _question(name: str, obj: str) -> list[Pair]:
    return [("how", ""), ("many", "ikutsu"), (obj, OBJECTS[obj]), ("does", ""), (name, NAMES[name]), ("", "ga"),
            ("have", "motsu"), ("now", "ima"), ("?", "？")]


def _ask(name: str, obj: str, lang: str) -> str:
    cue = "answer :" if lang == "e" else "kotae :"
    return " ".join(_render(_question(name, obj), "e" if lang == "e" else "j")) + " " + cue


# A story sentence is a list of (E token, J token(s)) pairs, so that a sentence can be rendered
# in either language or code-switched word by word. Function words without a counterpart
# are ("x", "") or ("", "x").
Pair = tuple[str, str]


def _story_sentence(rng: random.Random) -> list[Pair]:
    """One narrative sentence (never a total computed from other numbers)."""
    name, other = rng.sample(sorted(NAMES), 2)
    obj, adj, place = rng.choice(sorted(OBJECTS)), rng.choice(sorted(ADJECTIVES)), rng.choice(sorted(PLACES))
    n = rng.choice([rng.randint(0, OPERAND_MAX), rng.randint(0, OPERAND_MAX), rng.randint(0, MAX_NUMBER)])
    subj: list[Pair] = [(name, NAMES[name]), ("", "ga")]
    number: Pair = (str(n), num(n, "j"))
    kind = rng.randrange(12)
    if kind <= 2:  # has / finds / loses ...: a count, an event
        verb = rng.choice(["has", *sorted(ADD_VERBS), *sorted(SUB_VERBS), "wants", "counts"])
        body = [(verb, CONTENT[verb]), number, (obj, OBJECTS[obj])]
    elif kind == 3:
        body = [("gives", "ageru"), number, (obj, OBJECTS[obj]), ("to", ""), (other, NAMES[other]), ("", "he")]
    elif kind == 4:
        body = [("likes", "suki"), (obj, OBJECTS[obj])]
    elif kind == 5:
        body = [("sees", "miru"), (other, NAMES[other]), ("", "wo")]
    elif kind == 6:
        body = [("goes", "iku"), ("to", ""), ("the", ""), (place, PLACES[place]), ("", "he")]
    elif kind == 11:  # counting: numbers in sequence (no sums, no word problems)
        start = rng.randint(0, 20)
        seq: list[Pair] = [(str(k), num(k, "j")) for k in range(start, start + rng.randint(3, 6))]
        body = [("counts", "kazoeru"), *seq]
    elif kind == 9:  # a question, never followed by its answer
        return _question(name, obj)
    elif kind == 10:  # answers are written in digits in both languages; this one is random
        return [*subj, ("says", "iu"), ("answer", "kotae"), (":", ":"), (str(n), str(n)), (".", "。")]
    elif kind == 7:
        return [(name, NAMES[name]), ("", "wa"), ("is", ""), (adj, ADJECTIVES[adj]), ("", "desu"), (".", "。")]
    else:
        return [("the", ""), (obj, OBJECTS[obj]), ("", "wa"), ("are", ""), (adj, ADJECTIVES[adj]),
                ("", "desu"), (".", "。")]
    prefix: list[Pair] = []
    if rng.random() < 0.15:
        w = rng.choice(["today", "then"])
        prefix = [(w, OTHER[w])]
    return prefix + subj + body + [(".", "。")]


def _render(sentence: list[Pair], lang: str) -> list[str]:
    return [w for pair in sentence for w in [pair[0] if lang == "e" else pair[1]] if w]


def _code_switch(sentence: list[Pair], rng: random.Random, p: float) -> list[str]:
    """Render in a random matrix language; each content word or number switches with probability p."""
    lang = rng.choice("ej")
    out = []
    for e, j in sentence:
        swappable = e and j and e != j and (e in CONTENT or e.isdigit())
        use = ("j" if lang == "e" else "e") if swappable and rng.random() < p else lang
        w = e if use == "e" else j
        if w:
            out.append(w)
    return out


def story(rng: random.Random, lang: str) -> str:
    """A narrative of 2-6 sentences in `lang` ('e' or 'j')."""
    return " ".join(" ".join(_render(_story_sentence(rng), lang)) for _ in range(rng.randint(2, 6)))


def parallel(rng: random.Random) -> str:
    """A story in one language, `=`, the same story in the other."""
    sents = [_story_sentence(rng) for _ in range(rng.randint(1, 3))]
    e = " ".join(" ".join(_render(s, "e")) for s in sents)
    j = " ".join(" ".join(_render(s, "j")) for s in sents)
    return f"{e} = {j}" if rng.random() < 0.5 else f"{j} = {e}"


def aligned(rng: random.Random) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """A story in E and in J with its word alignment: (E words, J words, [(J index, E index)])."""
    e_words: list[str] = []
    j_words_: list[str] = []
    align = []
    for _ in range(rng.randint(1, 4)):
        for e, j in _story_sentence(rng):
            if e and j:
                align.append((len(j_words_), len(e_words)))
            if e:
                e_words.append(e)
            if j:
                j_words_.append(j)
    return e_words, j_words_, align


def mixed(rng: random.Random, p: float = 0.3) -> str:
    """A code-switched story."""
    return " ".join(" ".join(_code_switch(_story_sentence(rng), rng, p)) for _ in range(rng.randint(2, 6)))


def random_problem(rng: random.Random) -> Problem:
    verb = rng.choice(sorted(ADD_VERBS) + sorted(SUB_VERBS))
    a = rng.randint(0, OPERAND_MAX)
    b = rng.randint(0, OPERAND_MAX) if verb in ADD_VERBS else rng.randint(0, a)
    return Problem(rng.choice(sorted(NAMES)), rng.choice(sorted(OBJECTS)), verb, a, b)


# ---------------------------------------------------------------------------- splits

SEEDS = {"train": 1, "j_arith_dev": 101, "j_arith_test": 102, "e_arith_dev": 103, "e_arith_test": 104,
         "j_text_dev": 105, "j_text_test": 106}
SIZES = {"j_arith_dev": 600, "j_arith_test": 600, "e_arith_dev": 300, "e_arith_test": 300,
         "j_text_dev": 100, "j_text_test": 100}


def _distinct_problems(seed: int, n: int, exclude: set[Problem]) -> list[Problem]:
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        p = random_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@dataclass
class Splits:
    """The held-out items: problems for dev/test (J and E) and J texts for the language-model loss."""

    j_arith_dev: list[Problem]
    j_arith_test: list[Problem]
    e_arith_dev: list[Problem]
    e_arith_test: list[Problem]
    j_text_dev: list[str]
    j_text_test: list[str]

    def held_out_problems(self) -> set[Problem]:
        return {*self.j_arith_dev, *self.j_arith_test, *self.e_arith_dev, *self.e_arith_test}

    def held_out_texts(self) -> set[str]:
        return {*self.j_text_dev, *self.j_text_test}


def make_splits() -> Splits:
    """All held-out items, disjoint across splits by construction."""
    taken: set[Problem] = set()
    parts: dict[str, list[Problem]] = {}
    for name in ("j_arith_test", "j_arith_dev", "e_arith_test", "e_arith_dev"):
        parts[name] = _distinct_problems(SEEDS[name], SIZES[name], taken)
        taken.update(parts[name])
    texts = {}
    for name in ("j_text_dev", "j_text_test"):
        rng = random.Random(SEEDS[name])
        texts[name] = [story(rng, "j") for _ in range(SIZES[name])]
    return Splits(**parts, **texts)


def stream(kind: str, seed: int, splits: Splits) -> Iterator[str]:
    """An endless stream of training documents of one kind, never a held-out item.

    Kinds: e_story, j_story, parallel, mixed, e_arith. E problems whose J or E rendering
    is held out (in any split) are skipped, as are J stories equal to a held-out J text.
    """
    rng = random.Random(f"{kind}:{seed}")
    held_problems, held_texts = splits.held_out_problems(), splits.held_out_texts()
    while True:
        if kind == "e_story":
            yield story(rng, "e")
        elif kind == "j_story":
            t = story(rng, "j")
            if t not in held_texts:
                yield t
        elif kind == "parallel":
            yield parallel(rng)
        elif kind == "mixed":
            yield mixed(rng)
        elif kind == "e_arith":
            p = random_problem(rng)
            if p not in held_problems:
                yield p.text("e")
        else:
            raise ValueError(f"unknown text kind {kind!r}")


def majority_answer(problems: list[Problem]) -> tuple[int, float]:
    """The most frequent answer and the accuracy of always giving it."""
    counts: dict[int, int] = {}
    for p in problems:
        counts[p.answer] = counts.get(p.answer, 0) + 1
    best = max(sorted(counts), key=lambda k: counts[k])
    return best, counts[best] / len(problems)
