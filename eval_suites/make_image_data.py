#!/usr/bin/env python3
"""Regenerate the bundled image suites (eval_suites/data/image_qa_*.jsonl and data/images/image_qa/*.png).

Questions about small pictures drawn here, for vision-language models: the colour of a shape, its kind, how
many shapes there are, and the word written in the picture. Each picture is asked about in English
(``image_qa_e_*``) and in Japanese (``image_qa_j_*``: the cross-skill version, as EvoVLM-JP was scored: a
Japanese question about an image, a Japanese answer). Three splits, disjoint: ``dev`` (fitness), ``val`` (the
final choice) and ``test`` (held out); no picture, and no word written in one, is in two splits.

    python eval_suites/make_image_data.py            # needs Pillow; the same pixels every time

The pictures are 96 x 96 RGB PNGs on white, drawn without anti-aliasing: shapes with ``ImageDraw``'s
rectangle, ellipse and polygon, words in a 5 x 7 pixel font defined below (no font file: any machine draws the
same letters). Everything else (which picture goes to which split, the positions and sizes) comes from a
seeded ``random.Random``, so the script writes the same files every time; Pillow's shape rasteriser is the one
thing outside it (the committed PNGs were drawn with Pillow 13.0).

Scored by generation (lm-eval's multimodal model type scores images only by ``generate_until``): the answer is
one word or digit, compared with ``exact_match`` after the leading whitespace is stripped (case ignored).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
DATA_DIR = SUITE_DIR / "data"
IMAGE_DIR = DATA_DIR / "images" / "image_qa"
SIZE = 96
SEED = "image_qa/v1"
SPLITS = {"dev": 12, "val": 6, "test": 12}  # documents per kind of question, per split
KINDS = ("colour", "shape", "count", "text")

COLOURS = {  # name: (RGB, Japanese)
    "red": ((220, 30, 30), "赤"),
    "blue": ((30, 60, 220), "青"),
    "green": ((30, 160, 50), "緑"),
    "yellow": ((235, 195, 20), "黄色"),
    "purple": ((140, 50, 180), "紫"),
    "black": ((20, 20, 20), "黒"),
}
SHAPES = {"circle": ("circles", "丸"), "square": ("squares", "四角"), "triangle": ("triangles", "三角")}
WORDS = {  # disjoint per split: a word read in one split is never asked in another
    "dev": ["CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "MAP", "PEN", "TOY", "ZOO", "JAR", "WEB"],
    "val": ["BUS", "KEY", "EGG", "ANT", "BED", "FAN"],
    "test": ["FOX", "OWL", "JAM", "LOG", "NUT", "BAG", "VAN", "RUG", "GYM", "ICE", "KIT", "QUIZ"],
}
PROMPTS = {
    "e": {
        "colour": "What colour is the shape?",
        "shape": "What shape is this?",
        "count": "How many {plural} are there?",
        "text": "What word is written in the picture?",
        "suffix": " Answer with one word.\nAnswer:",
    },
    "j": {
        "colour": "この図形は何色ですか？",
        "shape": "この図形は何の形ですか？",
        "count": "{japanese}はいくつありますか？",
        "text": "絵に書かれている単語は何ですか？",
        "suffix": "一語で答えてください。\n答え:",
    },
}

FONT = {  # 5 x 7 pixel capitals
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "),
    "D": ("#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "G": (" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "I": (" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "J": ("  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "Q": (" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "),
    "W": ("#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "Y": ("#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "Z": ("#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"),
}


# --------------------------------------------------------------------------- what each picture shows


def picture_keys(rng: random.Random) -> dict[str, dict[str, list[tuple]]]:
    """Per split and kind of question, the pictures (as keys: what is drawn where), each key in one split only.

    Within a kind, the answers take turns (every colour, shape or count as often as the split's size allows)."""
    one_shape = [(s, c, size, cell) for s in SHAPES for c in COLOURS for size in (18, 26, 34) for cell in range(4)]
    rng.shuffle(one_shape)
    counts = [(s, n, c) for s in SHAPES for n in range(1, 6) for c in COLOURS]
    rng.shuffle(counts)
    words = {split: [(w, rng.choice(list(COLOURS))) for w in WORDS[split]] for split in SPLITS}
    used: set[tuple] = set()
    out: dict[str, dict[str, list[tuple]]] = {}
    for split, n in SPLITS.items():
        out[split] = {
            "colour": _take(one_shape, n, answer=lambda k: k[1], used=used),
            "shape": _take(one_shape, n, answer=lambda k: k[0], used=used),
            "count": _take(counts, n, answer=lambda k: k[1], used=used),
            "text": words[split][:n],
        }
    return out


def _take(pool: list[tuple], n: int, answer: Callable[[tuple], object], used: set[tuple]) -> list[tuple]:
    """`n` keys of `pool` not used before (in any split, by any kind of question: a picture is asked about once),
    the answers taking turns."""
    answers = list(dict.fromkeys(answer(k) for k in pool))
    chosen: list[tuple] = []
    while len(chosen) < n:
        want = answers[len(chosen) % len(answers)]
        key = next(k for k in pool if answer(k) == want and k not in used)
        used.add(key)
        chosen.append(key)
    return chosen


# --------------------------------------------------------------------------- drawing


def draw_shape(draw, shape: str, centre: tuple[int, int], size: int, rgb: tuple[int, int, int]) -> None:
    """One filled shape of `size` pixels across, centred at `centre`."""
    x, y = centre
    r = size // 2
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=rgb)
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=rgb)


def draw_word(draw, word: str, rgb: tuple[int, int, int], rng: random.Random) -> None:
    """`word` in the 5 x 7 font, 3 pixels a font pixel, at a seeded position that keeps it whole."""
    scale, gap = 3, 3
    width = len(word) * 5 * scale + (len(word) - 1) * gap
    left = rng.randint(4, SIZE - 4 - width)
    top = rng.randint(4, SIZE - 4 - 7 * scale)
    for i, letter in enumerate(word):
        x0 = left + i * (5 * scale + gap)
        for row, bits in enumerate(FONT[letter]):
            for col, bit in enumerate(bits):
                if bit == "#":
                    x, y = x0 + col * scale, top + row * scale
                    draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=rgb)


def picture(kind: str, key: tuple, rng: random.Random):
    """The PIL image of one key."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if kind in ("colour", "shape"):
        shape, colour, size, cell = key
        half = SIZE // 2
        cx = (cell % 2) * half + half // 2 + rng.randint(-4, 4)
        cy = (cell // 2) * half + half // 2 + rng.randint(-4, 4)
        draw_shape(draw, shape, (cx, cy), size, COLOURS[colour][0])
    elif kind == "count":
        shape, n, colour = key
        cells = rng.sample(range(9), n)  # a 3 x 3 grid of 32-pixel cells: the shapes never touch
        for cell in cells:
            cx = (cell % 3) * 32 + 16 + rng.randint(-3, 3)
            cy = (cell // 3) * 32 + 16 + rng.randint(-3, 3)
            draw_shape(draw, shape, (cx, cy), 18, COLOURS[colour][0])
    else:
        word, colour = key
        draw_word(draw, word, COLOURS[colour][0], rng)
    return img


# --------------------------------------------------------------------------- questions


def question(kind: str, key: tuple, language: str) -> tuple[str, str]:
    """(prompt, answer) of a picture in `language` (`e` or `j`)."""
    text = PROMPTS[language]
    if kind == "colour":
        answer = key[1] if language == "e" else COLOURS[key[1]][1]
        asked = text["colour"]
    elif kind == "shape":
        answer = key[0] if language == "e" else SHAPES[key[0]][1]
        asked = text["shape"]
    elif kind == "count":
        plural, japanese = SHAPES[key[0]]
        answer = str(key[1])
        asked = text["count"].format(plural=plural, japanese=japanese)
    else:
        answer = key[0]
        asked = text["text"]
    prefix = "Question: " if language == "e" else "質問: "
    return prefix + asked + text["suffix"], answer


def build(out_dir: Path = DATA_DIR) -> dict[str, int]:
    """Write every PNG and the six JSONL files (dev, val and test; English and Japanese); rows per file."""
    rng = random.Random(SEED)
    keys = picture_keys(rng)
    image_dir = out_dir / "images" / "image_qa"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.glob("*.png"):
        old.unlink()
    written = {}
    for split, by_kind in keys.items():
        docs = [(kind, key) for kind in KINDS for key in by_kind[kind]]
        random.Random(f"{SEED}/{split}/order").shuffle(docs)  # any `limit` is a mix of the kinds
        rows: dict[str, list[dict[str, str]]] = {"e": [], "j": []}
        for i, (kind, key) in enumerate(docs):
            name = f"{split}_{i:03d}.png"
            picture(kind, key, random.Random(f"{SEED}/{split}/{i}")).save(image_dir / name, optimize=False)
            for language, lang_rows in rows.items():
                prompt, answer = question(kind, key, language)
                lang_rows.append({"image": f"data/images/image_qa/{name}", "kind": kind, "prompt": prompt,
                                  "answer": answer})
        for language, lang_rows in rows.items():
            path = out_dir / f"image_qa_{language}_{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lang_rows), encoding="utf-8")
            written[path.name] = len(lang_rows)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="the suite's data folder (default: beside this)")
    args = parser.parse_args()
    for name, n in build(args.out).items():
        print(f"{name}: {n} rows")


if __name__ == "__main__":
    main()
