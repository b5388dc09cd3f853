"""Two SmolLM2 specialists made here, as LoRA adapters: J (the zoo's invented language) and M (arithmetic).

The paper's parents each had one skill and lacked the other (a Japanese model, an English math model);
these are made the same way from SmolLM2-135M-Instruct, deterministically, on this CPU:

- **J** learns the language J of `apps/zoo/world.py` (J stories, E-J parallel text, code-switched text,
  loss on every position); LoRA on the bottom and top layer blocks only. It never sees a word problem.
- **M** learns English arithmetic word problems with digit answers (loss on the answer only); LoRA on the
  middle block only. It never sees J.

Restricting each adapter to a block of layers copies what Layer Swapping (Bandarkar et al., 2024) observed
in real fine-tunes (language in the outer layers, math in the middle); here it is imposed by training.
The target, word problems posed in J with digit answers, is never trained on by either (checked by
`tests/apps/test_specialists.py`). `python -m dfs_merge.apps.specialists train j m` writes
`models/family/{j,m}` (adapter, recipe, scores); `suites` writes the bundled lm-eval tasks; `check`
scores the committed adapters directly (greedy answers, J loss) against `scores.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dfs_merge import bundled
from dfs_merge.apps.zoo import world

BASE = "smollm2-135m-instruct"
FAMILY_DIR = bundled.models_dir() / "family"
SUITE_DIR = bundled.suites_dir()
LAYERS = 30
BOTTOM, MIDDLE, TOP = list(range(0, 8)), list(range(8, 22)), list(range(22, 30))
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> what it learns from, which layers it may change, and how long it trains
RECIPES: dict[str, dict[str, Any]] = {
    "j": {"mix": {"j_story": 0.4, "parallel": 0.3, "mixed": 0.2, "e_story": 0.1}, "layers": BOTTOM + TOP,
          "answer_only": False, "steps": 350, "batch": 8, "max_tokens": 64, "lr": 1e-3, "seed": 11,
          # the hidden state after the bottom block at each J word pulled towards the base's at the aligned word
          # of the E rendering (weight 3, 8 parallel stories a step), so that the middle reads J as it reads E
          "align": {"after_layer": BOTTOM[-1], "weight": 3.0, "docs": 8},
          # and on E stories the bottom block's output kept at the base's (replay, in hidden-state form; attempt
          # 7 of docs/family.md also kept the top block's, after_layers [7, 29]: the merge's arithmetic did not move)
          "preserve": {"kind": "e_story", "after_layers": [BOTTOM[-1]], "weight": 1.0, "docs": 4}},
    "m": {"mix": {"e_arith": 1.0}, "layers": MIDDLE, "answer_only": True, "steps": 800, "batch": 8,
          "max_tokens": 64, "lr": 1e-3, "seed": 12,
          # on E stories the middle block's output kept at the base's: M changes what arithmetic needs only
          "preserve": {"kind": "e_story", "after_layers": [MIDDLE[-1]], "weight": 1.0, "docs": 4}},
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": LINEAR}
VAL_SEED, VAL_SIZE = 107, 300  # J problems for the final choice (validation), disjoint from dev and test


# ---- data -------------------------------------------------------------------------------------------------
def splits() -> tuple[world.Splits, list[world.Problem]]:
    """The zoo's held-out items (J problems dev 600 / test 600, E problems, J texts) and a J validation split."""
    held = world.make_splits()
    val = world._distinct_problems(VAL_SEED, VAL_SIZE, held.held_out_problems())
    return held, val


def training_texts(name: str, held: world.Splits, val: Sequence[world.Problem]) -> Iterator[str]:
    """The endless, seeded stream of one specialist's training documents (never a held-out item)."""
    recipe = RECIPES[name]
    rng = random.Random(recipe["seed"])
    kinds, weights = zip(*recipe["mix"].items(), strict=True)
    streams = {k: world.stream(k, recipe["seed"], held) for k in kinds}
    excluded = {p.text("e") for p in val}
    while True:
        text = next(streams[rng.choices(kinds, weights)[0]])
        if text not in excluded:
            yield text


def preserved_texts(name: str, held: world.Splits) -> Iterator[str]:
    """The seeded stream of texts on which a specialist's block is kept acting as the base's (`preserve`), never a
    held-out item; empty for a recipe without one."""
    p = RECIPES[name].get("preserve")
    return world.stream(p["kind"], RECIPES[name]["seed"], held) if p else iter(())


def batch_of(texts: Sequence[str], tok: Any, answer_only: bool, max_tokens: int) -> tuple[Any, Any, Any]:
    """Token ids, attention mask and label mask of a batch: every position, or only the answer's tokens."""
    import torch

    rows, masks = [], []
    for text in texts:
        if answer_only:
            question, answer = text.rsplit(" ", 1)
            q = tok(" " + question)["input_ids"]
            a = tok(" " + answer)["input_ids"] + [tok.eos_token_id]
            ids, labels = (q + a)[-max_tokens:], ([0] * len(q) + [1] * len(a))[-max_tokens:]
        else:
            ids = tok(" " + text)["input_ids"][:max_tokens]
            labels = [1] * len(ids)
        rows.append(ids)
        masks.append(labels)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
    return ids, attention, labels


def word_ends(words: Sequence[str], tok: Any) -> tuple[list[int], list[int]]:
    """Token ids of `words` joined by spaces (with a leading one) and the index of each word's last token."""
    ids, ends = [], []
    for w in words:
        ids += tok(" " + w, add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    return ids, ends


def align_loss(model: Any, tok: Any, rng: random.Random, after_layer: int, docs: int) -> Any:
    """Parallel stories (`world.aligned`): the adapted model's hidden state after layer `after_layer` at each
    J word's last token, pulled towards the base's (adapters off) at the aligned E word's; normalised MSE."""
    import torch

    stories = [world.aligned(rng) for _ in range(docs)]
    rows = []
    for side in (0, 1):  # E words, J words
        encoded = [word_ends(story[side], tok) for story in stories]
        width = max(len(ids) for ids, _ in encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded])
        rows.append((ids, mask, [ends for _, ends in encoded]))
    (e_ids, e_mask, e_ends), (j_ids, j_mask, j_ends) = rows
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=e_ids, attention_mask=e_mask, output_hidden_states=True).hidden_states[after_layer + 1]
    got = model(input_ids=j_ids, attention_mask=j_mask, output_hidden_states=True).hidden_states[after_layer + 1]
    pairs = [(b, j_ends[b][jx], e_ends[b][ex]) for b, (_, _, align) in enumerate(stories) for jx, ex in align]
    b, jt, et = (torch.tensor(v) for v in zip(*pairs, strict=True))
    target = ref[b, et]
    return (got[b, jt] - target).pow(2).mean() / target.pow(2).mean()


def preserve_loss(model: Any, tok: Any, texts: Sequence[str], after_layers: Sequence[int], max_tokens: int) -> Any:
    """The adapted model's hidden state after each layer of `after_layers` on `texts`, pulled towards the base's
    (adapters off) at every position; the sum of normalised MSEs. Keeps an adapter's blocks acting as the base's
    on text they must not change (replay in hidden-state form). Only the layers up to the last one named run."""
    import torch

    ids, attention, _ = batch_of(texts, tok, False, max_tokens)
    inner = model.base_model.model.model
    layers = inner.layers
    inner.layers = layers[: max(after_layers) + 2]  # hidden_states[k + 1] is layer k's output before the final norm
    try:
        with torch.no_grad(), model.disable_adapter():
            ref = inner(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        got = inner(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
    finally:
        inner.layers = layers
    keep = attention.bool()
    losses = [(got[k + 1][keep] - ref[k + 1][keep]).pow(2).mean() / ref[k + 1][keep].pow(2).mean()
              for k in after_layers]
    return sum(losses[1:], losses[0])


def loss_where_labelled(model: Any, ids: Any, attention: Any, labels: Any) -> Any:
    """Next-token cross-entropy at the labelled positions, the LM head computed only there (its 49k x 576
    matrix over every position would be most of a step's cost)."""
    import torch

    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    targets = labels[:, 1:]
    picked = hidden[:, :-1][targets]
    logits = model.lm_head(picked)
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][targets])


# ---- training ---------------------------------------------------------------------------------------------
def deterministic(seed: int) -> None:
    """One thread count, fixed seeds, deterministic kernels: the same adapter every time on this machine."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def base_model() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (float32) and its tokenizer, from the model store."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfs_merge.models.store import fetch

    folder = fetch(BASE)
    tok = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), tok


def train(name: str, out_dir: Path = FAMILY_DIR, log: Callable[[str], Any] = print, steps: int | None = None) -> Path:
    """Train one specialist's LoRA adapter into `out_dir/name` (adapter files and recipe.json)."""
    import torch
    from peft import LoraConfig, get_peft_model

    recipe = RECIPES[name]
    steps = steps if steps is not None else recipe["steps"]
    deterministic(recipe["seed"])
    model, tok = base_model()
    lora = LoraConfig(**LORA, layers_to_transform=recipe["layers"], init_lora_weights=True)
    model = get_peft_model(model, lora)
    held, val = splits()
    texts = training_texts(name, held, val)
    align_rng = random.Random(f"align:{recipe['seed']}")
    kept_texts = preserved_texts(name, held)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ids, attention, labels = batch_of([next(texts) for _ in range(recipe["batch"])], tok, recipe["answer_only"],
                                          recipe["max_tokens"])
        loss = loss_where_labelled(model.base_model.model, ids, attention, labels)
        if "align" in recipe:
            a = recipe["align"]
            loss = loss + a["weight"] * align_loss(model, tok, align_rng, a["after_layer"], a["docs"])
        if "preserve" in recipe:
            p = recipe["preserve"]
            texts_kept = [next(kept_texts) for _ in range(p["docs"])]
            loss = loss + p["weight"] * preserve_loss(model, tok, texts_kept, p["after_layers"], recipe["max_tokens"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"[{name}] step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s")
    folder = out_dir / name
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE  # the packaged name, not this machine's cache folder
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's template card; recipe.json says what this is
    (folder / "recipe.json").write_text(json.dumps({"base": BASE, "lora": LORA, **{k: v for k, v in recipe.items()},
                                                    "steps": steps, "seconds": round(time.perf_counter() - t0)},
                                                   indent=1) + "\n")
    return folder


# ---- the target and its guards as bundled lm-eval tasks ---------------------------------------------------
TEMPLATE = """\
# Shared by the family_arith_* tasks (written by `python -m dfs_merge.apps.specialists suites`): a word problem
# up to its answer cue (`answer :` in E, `kotae :` in J), the context starting with a space as in M's training.
# `acc` is 1 when the answer's tokens (" 13" is three SmolLM2 tokens) are the model's greedy continuation:
# greedy decoding's exact match on the answer, from one forward pass per problem instead of a generation loop
# (about 10x cheaper on a CPU). `perplexity` (exp of minus the answers' mean log-likelihood, from the same
# forward) is the smooth statistic a search can climb instead (`metrics: {task: perplexity}`); acc is the default.
dataset_path: json
custom_dataset: !function local_data.load
test_split: test
output_type: loglikelihood
doc_to_text: " {{question}}"
doc_to_target: " {{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""
TASK = """\
include: _template_family_arith.yaml
task: {task}
dataset_kwargs:
  data_files:
    test: data/{data}.jsonl
"""
LM_VAL_TASK = """\
include: _template_zoo_lm.yaml
task: zoo_lm_j_val
dataset_kwargs:
  data_files:
    test: data/zoo_lm_j_dev.jsonl
  rows: [50, 100]
"""
# task -> data file: the zoo's problems (the same items, scored with SmolLM2's answer length), and a new
# J validation split for the final choice. The J language-model guard is the zoo's `zoo_lm_j_{dev,test}`.
FAMILY_TASKS = {"family_arith_j_dev": "zoo_arith_j_dev", "family_arith_j_val": "family_arith_j_val",
                "family_arith_j_test": "zoo_arith_j_test", "family_arith_e_dev": "zoo_arith_e_dev",
                "family_arith_e_test": "zoo_arith_e_test"}
# The target as MGSM-JA writes it: the same J problems (dev, val, test: the same items as above) with their
# operands in digits, the tokens M learned arithmetic on. Each row names its operation (`op`: add | sub).
DIGIT_TASKS = {"family_arith_jd_dev": "j_arith_dev", "family_arith_jd_val": "j_arith_val",
               "family_arith_jd_test": "j_arith_test"}


def write_suites(suite_dir: Path = SUITE_DIR) -> list[Path]:
    """Write the family's lm-eval tasks (YAML in `suite_dir`) and the J validation problems (JSONL in data/)."""
    held, val = splits()
    out = [suite_dir / "_template_family_arith.yaml", suite_dir / "data" / "family_arith_j_val.jsonl"]
    out[0].write_text(TEMPLATE, encoding="utf-8")
    out[1].write_text("".join(json.dumps({"question": p.question("j"), "answer": str(p.answer)}, ensure_ascii=False)
                              + "\n" for p in val), encoding="utf-8")
    for task, data in FAMILY_TASKS.items():
        path = suite_dir / f"{task}.yaml"
        path.write_text(TASK.format(task=task, data=data), encoding="utf-8")
        out.append(path)
    problems = {"j_arith_dev": held.j_arith_dev, "j_arith_val": val, "j_arith_test": held.j_arith_test}
    for task, split in DIGIT_TASKS.items():
        data = suite_dir / "data" / f"{task}.jsonl"
        data.write_text("".join(json.dumps(
            {"question": p.question("jd"), "answer": str(p.answer), "op": p.op, "a": p.a, "b": p.b},
            ensure_ascii=False) + "\n" for p in problems[split]), encoding="utf-8")
        path = suite_dir / f"{task}.yaml"
        path.write_text(TASK.format(task=task, data=task), encoding="utf-8")
        out += [data, path]
    # The J language-model guard for the final choice: J stories 50-99 of the zoo's dev file (a search reads
    # at most its first 20), so that validation checks the J loss on texts the search never scored.
    path = suite_dir / "zoo_lm_j_val.yaml"
    path.write_text(LM_VAL_TASK, encoding="utf-8")
    return [*out, path]


# ---- direct scores (training checks; the README table uses lm-eval) --------------------------------------
def answer_accuracy(model: Any, tok: Any, problems: Sequence[world.Problem], lang: str, batch: int = 32) -> float:
    """Greedy answer of each problem (first number in up to 4 new tokens) against the true one."""
    import re

    import torch

    tok.padding_side = "left"
    right = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        enc = tok([" " + p.question(lang) for p in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        for p, row in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            m = re.search(r"\d+", tok.decode(row, skip_special_tokens=True))
            right += bool(m) and int(m.group()) == p.answer
    return right / len(problems)


def lm_loss(model: Any, tok: Any, texts: Sequence[str]) -> float:
    """Mean next-token loss (nats per token) over `texts`."""
    import torch

    total = count = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = tok(" " + text, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / count


def quick_scores(model: Any, tok: Any, n: int = 200) -> dict[str, float]:
    """J arithmetic and E arithmetic accuracy on the dev problems, J loss on the dev J texts."""
    held, _ = splits()
    return {
        "j_arith_dev": round(answer_accuracy(model, tok, held.j_arith_dev[:n], "j"), 4),
        "e_arith_dev": round(answer_accuracy(model, tok, held.e_arith_dev[:n], "e"), 4),
        "j_loss_dev": round(lm_loss(model, tok, held.j_text_dev[: n // 2]), 4),
    }


def scored(name: str | None, folder: Path = FAMILY_DIR) -> dict[str, float]:
    """`quick_scores` of the base (name None) or the base with one committed adapter merged."""
    model, tok = base_model()
    if name is not None:
        from dfs_merge.models.adapters import merged_model

        model = merged_model(model, folder / name)
    return quick_scores(model.eval(), tok)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dfs_merge.apps.specialists train [j] [m] | check | suites`."""
    ap = argparse.ArgumentParser(prog="python -m dfs_merge.apps.specialists")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("names", nargs="*", default=["j", "m"])
    t.add_argument("--out", type=Path, default=FAMILY_DIR)
    t.add_argument("--steps", type=int)
    c = sub.add_parser("check")
    c.add_argument("--out", type=Path, default=FAMILY_DIR)
    sub.add_parser("suites")
    args = ap.parse_args(argv)
    if args.cmd == "suites":
        for path in write_suites():
            print(path)
        return 0
    import torch

    torch.set_num_threads(1)  # the committed adapters were trained with one thread each (the same bits need it)
    if args.cmd == "train":
        for name in args.names:
            folder = train(name, args.out, steps=args.steps)
            scores = scored(name, args.out)
            print(f"[{name}] {folder}: {scores}", flush=True)
            (folder / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        return 0
    return check(args.out)


def check(folder: Path, committed: Path = FAMILY_DIR, tolerance: float = 0.005) -> int:
    """Score the adapters in `folder` and compare with the committed `scores.json`; 1 if any differs."""
    print("base", scored(None, folder), flush=True)
    bad = 0
    for name in RECIPES:
        now = scored(name, folder)
        want = json.loads((committed / name / "scores.json").read_text())
        diff = {k: (want.get(k), v) for k, v in now.items() if abs(v - want.get(k, math.inf)) > tolerance}
        print(name, now, "reproduced" if not diff else f"DIFFERS from {committed / name / 'scores.json'}: {diff}",
              flush=True)
        bad |= bool(diff)
    return int(bad)


if __name__ == "__main__":
    sys.exit(main())
