#!/usr/bin/env python3
"""Regenerate the bundled eval-suite data (eval_suites/data/*.jsonl). Standard library only.

Text source: "Alice's Adventures in Wonderland" by Lewis Carroll (1865; public domain),
Millennium Fulcrum Edition 2.9, as the file ``tests/testdata/alice29.txt`` of the
``brotli`` 1.2.1 source distribution on PyPI (MIT-licensed package; the file is the
Canterbury-corpus copy of the public-domain book). Get it with

    pip download --no-deps --no-binary :all: brotli==1.2.1
    python eval_suites/make_data.py --source brotli-1.2.1.tar.gz

``--source`` takes the sdist (.tar.gz) or the extracted ``alice29.txt``; its SHA-256 is
checked, so the output is byte-for-byte reproducible. The arithmetic task needs no source;
``--arith-only`` rewrites just that one.

Splits: chapters I-VI feed every ``*_dev`` file (fitness), chapters VII-XII every ``*_test``
file (held out). The arithmetic problems of dev and test are disjoint by construction.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

ALICE_MEMBER = "brotli-1.2.1/tests/testdata/alice29.txt"
ALICE_SHA256 = "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"
DATA_DIR = Path(__file__).resolve().parent / "data"

DEV_CHAPTERS = range(1, 7)  # I-VI
TEST_CHAPTERS = range(7, 13)  # VII-XII

# perplexity documents
PPL_MIN_WORDS, PPL_MAX_WORDS = 150, 250
PPL_DOCS_PER_SPLIT = 40

# cloze items
CLOZE_CONTEXT_WORDS = 20  # whole preceding sentences are added while the context is shorter
CLOZE_MIN_SENTENCE_WORDS = 6
CLOZE_MAX_QUERY_WORDS = 70

STOPWORDS = set(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other ought our
    ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    said say says one two shall must may might also yes well oh dear thing things way quite""".split()
)


# ---------------------------------------------------------------------------------------------
# reading the book


def read_source(path: Path) -> str:
    if path.suffixes[-2:] == [".tar", ".gz"] or path.suffix == ".tgz":
        with tarfile.open(path, "r:gz") as tar:
            member = tar.extractfile(ALICE_MEMBER)
            if member is None:
                sys.exit(f"{path}: no member {ALICE_MEMBER}")
            raw = member.read()
    else:
        raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ALICE_SHA256:
        sys.exit(f"{path}: sha256 {digest} is not the expected {ALICE_SHA256} (brotli 1.2.1 alice29.txt)")
    return raw.decode("ascii").replace("\r\n", "\n")


def normalise(s: str) -> str:
    """The edition marks opening quotes with a backtick: `like this'. Use a plain apostrophe."""
    s = s.replace("`", "'")
    return re.sub(r"[ \t]+", " ", s).strip()


def join_lines(lines: list[str]) -> str:
    out = ""
    for ln in lines:
        ln = ln.strip()
        if not out:
            out = ln
        elif out.endswith("-") and not out.endswith("--"):
            out += ln  # WAISTCOAT-\nPOCKET
        else:
            out += " " + ln
    return out


def parse_chapters(text: str) -> dict[int, list[tuple[str, str]]]:
    """chapter number -> [(kind, text)], kind 'prose' (one line) or 'verse' (line breaks kept)."""
    lines = text.split("\n")
    chapters: dict[int, list[list[str]]] = {}
    current = 0
    block: list[str] = []
    skip_title = False
    for ln in lines + [""]:
        m = re.fullmatch(r"\s*CHAPTER ([IVXL]+)\s*", ln)
        if m:
            current += 1
            chapters[current] = []
            skip_title = True
            block = []
            continue
        if current == 0:
            continue
        if skip_title:
            if ln.strip():
                skip_title = False  # the chapter's title line
            continue
        if ln.strip():
            block.append(ln)
        elif block:
            chapters[current].append(block)
            block = []
    parsed: dict[int, list[tuple[str, str]]] = {}
    for num, blocks in chapters.items():
        out = []
        for b in blocks:
            if all(set(x.strip()) <= {"*", " "} for x in b):
                continue  # section break
            if re.search(r"THE END\s*$", b[-1]) and len(b) == 1:
                continue
            indents = [len(x) - len(x.lstrip(" ")) for x in b]
            if max(indents) >= 4:
                out.append(("verse", "\n".join(normalise(x) for x in b)))
            else:
                out.append(("prose", normalise(join_lines(b))))
        parsed[num] = out
    return parsed


SENT_SPLIT = re.compile(r"(?<=[.!?])(?:['\")]+)?\s+(?=['\"(]?[A-Z])")


def sentences(paragraph: str) -> list[str]:
    out, start = [], 0
    for m in SENT_SPLIT.finditer(paragraph):
        end = m.start() + len(m.group(0).rstrip())
        out.append(paragraph[start:end].strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def nwords(s: str) -> int:
    return len(s.split())


# ---------------------------------------------------------------------------------------------
# perplexity documents


def ppl_docs(chapters: dict[int, list[tuple[str, str]]], nums: range, split: str) -> list[dict]:
    docs: list[dict] = []
    for num in nums:
        units: list[str] = []  # paragraphs, long ones cut at sentence boundaries
        for kind, txt in chapters[num]:
            if kind == "prose" and nwords(txt) > PPL_MAX_WORDS:
                piece: list[str] = []
                for s in sentences(txt):
                    if piece and nwords(" ".join(piece + [s])) > PPL_MAX_WORDS * 0.6:
                        units.append(" ".join(piece))
                        piece = []
                    piece.append(s)
                if piece:
                    units.append(" ".join(piece))
            else:
                units.append(txt)
        cur: list[str] = []
        for u in units:
            if cur and nwords("\n\n".join(cur + [u])) > PPL_MAX_WORDS:
                if nwords("\n\n".join(cur)) >= PPL_MIN_WORDS:
                    docs.append({"chapter": num, "text": "\n\n".join(cur)})
                cur = []
            cur.append(u)
            if nwords("\n\n".join(cur)) >= PPL_MIN_WORDS:
                docs.append({"chapter": num, "text": "\n\n".join(cur)})
                cur = []
        # a short tail of a chapter is dropped: documents never cross chapters
    if len(docs) < PPL_DOCS_PER_SPLIT:
        sys.exit(f"only {len(docs)} perplexity documents in {split}")
    # evenly spaced, so that every chapter of the split is represented
    step = len(docs) / PPL_DOCS_PER_SPLIT
    chosen = [docs[int(i * step)] for i in range(PPL_DOCS_PER_SPLIT)]
    random.Random(f"order/prose/{split}").shuffle(chosen)  # so that any --limit spans the chapters
    return [
        {
            "id": f"prose-{split}-{i:03d}",
            "chapter": d["chapter"],
            "words": nwords(d["text"]),
            "text": d["text"],
        }
        for i, d in enumerate(chosen)
    ]


# ---------------------------------------------------------------------------------------------
# cloze multiple choice

FINAL_WORD = re.compile(r"^(.*\S)\s+([a-z][a-z'-]*[a-z])([.!?][.!?'\")]*)$", re.S)
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")
CLAUSE_FINAL = re.compile(r"([A-Za-z][A-Za-z'-]*[A-Za-z])(?=[,;:.!?])")


def suffix_class(w: str) -> str:
    for suf in ("ly", "ing", "ed"):
        if w.endswith(suf) and len(w) > len(suf) + 2:
            return suf
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return "s"
    return "other"


def good_answer(w: str) -> bool:
    return w.isalpha() and w.islower() and len(w) >= 3 and w not in STOPWORDS


def cloze_items(chapters: dict[int, list[tuple[str, str]]], nums: range, split: str) -> list[dict]:
    prose = [(num, txt) for num in nums for kind, txt in chapters[num] if kind == "prose"]
    # vocabulary of the split: frequency of lower-case words; the distractor pool is words
    # that end a clause somewhere in the split (a cheap stand-in for "fits such a slot")
    freq: Counter[str] = Counter()
    for _, txt in prose:
        freq.update(w.lower() for w in WORD.findall(txt))
    lowercase_seen = Counter(w for _, txt in prose for w in WORD.findall(txt) if w.islower())
    pool = sorted(
        {
            w
            for _, txt in prose
            for w in CLAUSE_FINAL.findall(txt)
            if good_answer(w) and lowercase_seen[w] >= 1
        }
    )
    items: list[dict] = []
    for num in nums:
        sents = [s for kind, txt in chapters[num] if kind == "prose" for s in sentences(txt)]
        for k, sent in enumerate(sents):
            m = FINAL_WORD.match(sent)
            if not m or nwords(sent) < CLOZE_MIN_SENTENCE_WORDS:
                continue
            prefix, answer = m.group(1), m.group(2)
            if not good_answer(answer):
                continue
            context: list[str] = []
            j = k - 1
            while j >= 0 and nwords(" ".join(context)) < CLOZE_CONTEXT_WORDS:
                context.insert(0, sents[j])
                j -= 1
            query = " ".join(context + [prefix])
            if nwords(query) > CLOZE_MAX_QUERY_WORDS:
                query = " ".join(context[1:] + [prefix]) if len(context) > 1 else prefix
            if nwords(query) > CLOZE_MAX_QUERY_WORDS:
                continue
            used = {w.lower() for w in WORD.findall(query)}
            rng = random.Random(f"cloze/{split}/{num}/{k}/{answer}")
            cls, lf = suffix_class(answer), math.log2(freq[answer])
            distractors: list[str] = []
            for width in (1.0, 2.0, 3.0, 99.0):
                cands = [
                    w
                    for w in pool
                    if w != answer
                    and w not in used
                    and w not in distractors
                    and w[:4] != answer[:4]
                    and suffix_class(w) == cls
                    and abs(math.log2(freq[w]) - lf) <= width
                ]
                rng.shuffle(cands)
                distractors += cands[: 3 - len(distractors)]
                if len(distractors) == 3:
                    break
            if len(distractors) < 3:
                continue
            gold = rng.randrange(4)
            choices = distractors[:gold] + [answer] + distractors[gold:]
            items.append({"chapter": num, "query": query, "choices": choices, "gold": gold, "answer": answer})
    random.Random(f"order/cloze/{split}").shuffle(items)  # so that any --limit spans the chapters
    return [{"id": f"cloze-{split}-{i:03d}", **it} for i, it in enumerate(items)]


# ---------------------------------------------------------------------------------------------
# arithmetic generation


def arith_items() -> dict[str, list[dict]]:
    """Sums, differences and products of graded difficulty; answers are never negative.

    Per split: 20 one-digit sums, 20 one-digit differences, 15 one-digit products, 45 two-digit
    plus one-digit sums, 50 two-digit sums (150). No problem is in both splits; for the sums and
    products of one digit not even with the operands swapped. The three worked examples of the
    prompt (_template_arith_gen.yaml) are never asked.
    """
    rng = random.Random("arith/v2")
    prompt_examples = {(3, "+", 4), (4, "+", 3), (12, "-", 5), (25, "+", 3)}

    def small(pairs: list[tuple[int, str, int]], n: int) -> tuple[list, list]:
        pairs = [p for p in pairs if p not in prompt_examples]
        rng.shuffle(pairs)
        if len(pairs) < 2 * n:
            raise SystemExit(f"only {len(pairs)} problems for {2 * n}")
        return pairs[:n], pairs[n : 2 * n]

    def swap(p: tuple[int, str, int]) -> tuple[int, str, int]:
        return (p[2], p[1], p[0]) if rng.random() < 0.5 else p

    kinds: dict[str, tuple[list, list]] = {
        "1d+1d": small([(a, "+", b) for a in range(1, 10) for b in range(a, 10)], 20),
        "1d-1d": small([(a, "-", b) for a in range(2, 10) for b in range(1, a + 1)], 20),
        "1d*1d": small([(a, "*", b) for a in range(2, 10) for b in range(a, 10)], 15),
    }
    kinds["1d+1d"] = tuple([swap(p) for p in half] for half in kinds["1d+1d"])
    kinds["1d*1d"] = tuple([swap(p) for p in half] for half in kinds["1d*1d"])
    seen = set(prompt_examples)
    for name, lo_a, hi_a, lo_b, hi_b, n in (("2d+1d", 10, 89, 1, 9, 45), ("2d+2d", 10, 59, 10, 39, 50)):
        halves = []
        for _ in range(2):
            half = []
            while len(half) < n:
                p = (rng.randint(lo_a, hi_a), "+", rng.randint(lo_b, hi_b))
                if p not in seen:
                    seen.add(p)
                    half.append(p)
            halves.append(half)
        kinds[name] = tuple(halves)

    out: dict[str, list[dict]] = {}
    for k, split in enumerate(("dev", "test")):
        rows = []
        for name, halves in kinds.items():
            for a, op, b in halves[k]:
                ans = a + b if op == "+" else a - b if op == "-" else a * b
                rows.append({"kind": name, "question": f"{a} {op} {b}", "answer": str(ans)})
        random.Random(f"arith/order/{split}").shuffle(rows)  # kinds interleaved: any limit is a mix
        out[split] = [{"id": f"arith-{split}-{i:03d}", **r} for i, r in enumerate(rows)]
    return out


# ---------------------------------------------------------------------------------------------


def write_jsonl(name: str, rows: list[dict]) -> None:
    DATA_DIR.mkdir(exist_ok=True)
    path = DATA_DIR / name
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
    print(f"{path.relative_to(DATA_DIR.parent.parent)}: {len(rows)} rows")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="brotli-1.2.1.tar.gz, or its tests/testdata/alice29.txt")
    ap.add_argument("--arith-only", action="store_true", help="rewrite only the arithmetic files")
    args = ap.parse_args(argv)

    arith = arith_items()
    write_jsonl("arith_gen_dev.jsonl", arith["dev"])
    write_jsonl("arith_gen_test.jsonl", arith["test"])
    if args.arith_only:
        return 0
    if args.source is None:
        ap.error("--source is required (or --arith-only)")
    chapters = parse_chapters(read_source(args.source))
    if sorted(chapters) != list(range(1, 13)):
        sys.exit(f"expected 12 chapters, found {sorted(chapters)}")
    for split, nums in (("dev", DEV_CHAPTERS), ("test", TEST_CHAPTERS)):
        write_jsonl(f"prose_ppl_{split}.jsonl", ppl_docs(chapters, nums, split))
        write_jsonl(f"cloze_mc_{split}.jsonl", cloze_items(chapters, nums, split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
