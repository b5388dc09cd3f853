"""The zoo: a tiny model family trained here, deterministically, to run the paper's experiment in miniature.

Three Llama models share one word-level tokenizer and one hidden space (see `zoo_world` for
the world and its two languages, E and J):

- ``base``: trained from scratch on E stories only. It has never seen J or arithmetic.
- ``j`` (the J-language specialist): the base fine-tuned on J stories, E-J parallel text and
  code-switched text, with **only the embeddings, the bottom layers, the top layers, the final
  norm and the LM head trainable** (the middle layers stay the base's).
- ``m`` (the math specialist): the base fine-tuned on E word problems (with E stories as
  replay), with **only the middle layers trainable**.

The layer-block split is *imposed by training* (frozen layers), not emergent: it mimics what
Bandarkar et al. (2024) observed in real fine-tunes (language in the bottom and top layers,
math in the middle). No model is trained on a J problem, nor on any held-out item.

Target: J word problems (operands as J number words, answer in digits). The parents fail it:
J cannot do arithmetic, M cannot read J. The route J bottom -> M middle -> J top can.

Determinism: fixed seeds, one thread, `torch.use_deterministic_algorithms(True)`; weights are
saved as float16 (a few MB) and the specialists start from the saved (rounded) base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dfs_merge import bundled
from dfs_merge.apps.zoo import world

ROOT = bundled.root()  # the repository root in a clone
ZOO_DIR = ROOT / "models" / "zoo"
SUITE_DIR = ROOT / "eval_suites"

ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)
BOTTOM, MIDDLE, TOP = (0, 1), (2, 3, 4, 5), (6, 7)

# name -> (initial weights, text mix, trainable parameter groups, steps, lr, seed)
RECIPES: dict[str, dict[str, Any]] = {
    "base": dict(init=None, mix={"e_story": 1.0}, train="all", steps=800, lr=3e-3, seed=0),
    "j": dict(init="base", mix={"j_story": 0.45, "parallel": 0.3, "mixed": 0.15, "e_story": 0.1},
              train=("embed", *BOTTOM, *TOP, "head"), steps=600, lr=2e-3, seed=1, j_rows_only=True,
              anchor=BOTTOM[-1] + 1, align=True),
    "m": dict(init="base", mix={"e_arith": 0.5, "e_story": 0.5}, train=MIDDLE, steps=2500, lr=3e-3, seed=2,
              answer_only=True),
}
BATCH = 32
HAND_ROUTE = "0:0-1, 1:2-5, 0:6-7"  # over sources [j, m]: J bottom -> M middle -> J top
SCORES = "scores.json"


# ---------------------------------------------------------------------------- tokenizer and model


def make_tokenizer() -> Any:
    """The shared word-level tokenizer (whitespace split; the id of a word is its index in the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def make_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None, tie_word_embeddings=False, **ARCH)


def deterministic(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def trainable_names(model: Any, groups: Any) -> list[str]:
    """Parameter names that a recipe's `train` groups select ('all', 'embed', 'head', layer indices)."""
    names = [n for n, _ in model.named_parameters()]
    if groups == "all":
        return names
    keep = []
    for n in names:
        if n.startswith("model.embed_tokens") and "embed" in groups:
            keep.append(n)
        elif (n.startswith("lm_head") or n == "model.norm.weight") and "head" in groups:
            keep.append(n)
        elif n.startswith("model.layers.") and int(n.split(".")[2]) in groups:
            keep.append(n)
    return keep


def batches(mix: dict[str, float], seed: int, tok: Any, splits: world.Splits, answer_only: bool = False):
    """Endless training batches: documents of the mix's kinds, each followed by <eos>, half led by <eos>.

    With `answer_only`, a word problem's loss is on its answer token alone (the question's names
    and numbers are random: predicting them teaches nothing); other documents keep the full loss.
    """
    rng = random.Random(seed)
    kinds = sorted(mix)
    streams = {k: world.stream(k, seed, splits) for k in kinds}
    weights = [mix[k] for k in kinds]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    vocab = tok.get_vocab()
    while True:
        rows, answer_at = [], []
        for _ in range(BATCH):
            kind = rng.choices(kinds, weights)[0]
            text = next(streams[kind])
            ids = [vocab[w] for w in text.split()] + [eos]
            if rng.random() < 0.5:
                ids = [eos] + ids
            rows.append(ids[: ARCH["max_position_embeddings"]])
            answer_at.append(len(ids) - 2 if answer_only and kind == "e_arith" else None)
        width = max(map(len, rows))
        ids = torch.full((BATCH, width), pad)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        is_answer = torch.zeros_like(mask, dtype=torch.bool)
        for i, at in enumerate(answer_at):
            if at is not None:
                labels[i, :at] = -100
                labels[i, at + 1 :] = -100
                is_answer[i, at] = True
        yield ids, mask, labels, is_answer


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def align_loss(model: Any, ref_model: Any, tok: Any, rng: random.Random, layer: int, n: int = 16) -> torch.Tensor:
    """Parallel stories: the model's hidden state (after `layer` layers) at each J word is pulled towards
    the reference (base) model's hidden state at the aligned word of the E rendering."""
    vocab = tok.get_vocab()
    docs = [world.aligned(rng) for _ in range(n)]
    e_ids, e_mask = _pad([[vocab[w] for w in e] for e, _, _ in docs], tok.pad_token_id)
    j_ids, j_mask = _pad([[vocab[w] for w in j] for _, j, _ in docs], tok.pad_token_id)
    with torch.no_grad():
        ref = ref_model(input_ids=e_ids, attention_mask=e_mask, output_hidden_states=True).hidden_states[layer]
    got = model.model(input_ids=j_ids, attention_mask=j_mask, output_hidden_states=True).hidden_states[layer]
    rows = [(b, jx, ex) for b, (_, _, al) in enumerate(docs) for jx, ex in al]
    b, jx, ex = (torch.tensor(v) for v in zip(*rows, strict=True))
    target = ref[b, ex]
    return (got[b, jx] - target).pow(2).mean() / target.pow(2).mean()


def split_loss(logits: torch.Tensor, labels: torch.Tensor, is_answer: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean loss over answer tokens plus mean loss over all other tokens (each term weighs the same
    however few answers a batch holds), and the batch's answer accuracy."""
    logits, labels, is_answer = logits[:, :-1], labels[:, 1:], is_answer[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels.shape)
    text = (labels != -100) & ~is_answer
    loss = ce[is_answer].mean() + (ce[text].mean() if text.any() else 0.0)
    acc = (logits[is_answer].argmax(-1) == labels[is_answer]).float().mean().item()
    return loss, acc


def train(name: str, out_dir: Path = ZOO_DIR, log: Callable[[str], Any] = print, steps: int | None = None) -> Path:
    """Train one zoo model by its recipe and save it as a Hugging Face folder (float16 safetensors)."""
    from transformers import LlamaForCausalLM

    r = RECIPES[name]
    deterministic(r["seed"])
    tok = make_tokenizer()
    splits = world.make_splits()
    if r["init"] is None:
        model = LlamaForCausalLM(make_config(tok))
    else:
        model = LlamaForCausalLM.from_pretrained(out_dir / r["init"], dtype=torch.float32)
    model.train()
    keep = set(trainable_names(model, r["train"]))
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    params = [p for n, p in model.named_parameters() if n in keep]
    # With `j_rows_only`, the embedding and output rows of every token that is not a J word (E words,
    # digits, punctuation shared by both) are restored after each step: they stay the base's.
    frozen_rows = None
    if r.get("j_rows_only"):
        vocab = tok.get_vocab()
        j_ids = {vocab[w] for w in world.j_words()}
        frozen_rows = torch.tensor([i for i in range(len(vocab)) if i not in j_ids])
        row_tensors = [model.model.embed_tokens.weight, model.lm_head.weight]
        saved_rows = [t.detach()[frozen_rows].clone() for t in row_tensors]
    # With `anchor` (a hidden-state index), the hidden state after the bottom layers is pulled towards
    # the base's at every position whose prefix holds no J word: E keeps the base's representation,
    # so the middle layers of any sibling (M) still read E (and E-like J) as they were trained to.
    anchor_model = None
    if r.get("anchor"):
        anchor_model = LlamaForCausalLM.from_pretrained(out_dir / r["init"], dtype=torch.float32).eval()
        anchor_model.requires_grad_(False)
        j_lookup = torch.zeros(len(tok), dtype=torch.bool)
        j_lookup[[tok.get_vocab()[w] for w in world.j_words()]] = True
        align_rng = random.Random(f"align:{r['seed']}")
    opt = torch.optim.AdamW(params, lr=r["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    total = steps or r["steps"]
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    t0, ema, acc_ema = time.time(), None, 0.0
    for step, (ids, mask, labels, is_answer) in zip(range(total), batches(r["mix"], r["seed"], tok, splits, r.get("answer_only", False)),
                                                     strict=False):
        if r.get("answer_only"):
            loss, acc = split_loss(model(input_ids=ids, attention_mask=mask).logits, labels, is_answer)
            acc_ema = 0.95 * acc_ema + 0.05 * acc
        elif anchor_model is not None:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
            with torch.no_grad():
                ref = anchor_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                    r["anchor"]]
            pure_e = (j_lookup[ids].cumsum(1) == 0) & (mask == 1)
            diff = (out.hidden_states[r["anchor"]] - ref)[pure_e]
            loss = out.loss + (diff.pow(2).mean() / ref[pure_e].pow(2).mean()) if pure_e.any() else out.loss
            if r.get("align"):
                loss = loss + align_loss(model, anchor_model, tok, align_rng, r["anchor"])
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if frozen_rows is not None:
            with torch.no_grad():
                for t, saved in zip(row_tensors, saved_rows, strict=True):
                    t[frozen_rows] = saved
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == total - 1:
            extra = f" answer acc {acc_ema:.2f}" if r.get("answer_only") else ""
            log(f"[{name}] step {step}/{total} loss {ema:.3f}{extra} ({time.time() - t0:.0f} s)")
    folder = out_dir / name
    model.eval().half()
    model.config.dtype = "float16"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    log(f"[{name}] saved {folder} in {time.time() - t0:.0f} s; sha256 {weights_digest(folder)[:16]}")
    return folder


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- parameter-space merges


def load(name_or_path: str | Path) -> Any:
    from transformers import LlamaForCausalLM

    p = Path(name_or_path)
    folder = p if p.is_dir() else ZOO_DIR / str(name_or_path)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)


def merge_state(kind: str, base: dict, j: dict, m: dict, weight: float = 1.0) -> dict:
    """`average`: (J + M) / 2; `task_arithmetic`: base + weight * ((J - base) + (M - base))."""
    if kind == "average":
        return {k: (j[k] + m[k]) / 2 for k in base}
    if kind == "task_arithmetic":
        return {k: base[k] + weight * ((j[k] - base[k]) + (m[k] - base[k])) for k in base}
    raise ValueError(kind)


def write_merge(kind: str, out: Path, zoo: Path = ZOO_DIR, weight: float = 1.0) -> Path:
    """Write a parameter-space merge of the zoo's J and M as a Hugging Face folder (float32)."""
    models = {n: load(zoo / n) for n in ("base", "j", "m")}
    sd = merge_state(kind, *(models[n].state_dict() for n in ("base", "j", "m")), weight=weight)
    merged = models["base"]
    merged.load_state_dict(sd)
    merged.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- direct scoring (quick, no lm-eval)


@torch.inference_mode()
def arith_accuracy(model: Any, tok: Any, problems: Sequence[world.Problem], lang: str) -> float:
    """Greedy next-token accuracy on the answer (every question of a language has the same length)."""
    vocab = tok.get_vocab()
    ids = torch.tensor([[vocab[w] for w in p.question(lang).split()] for p in problems])
    want = torch.tensor([vocab[str(p.answer)] for p in problems])
    hits = 0
    for s in range(0, len(ids), 256):
        logits = model(input_ids=ids[s : s + 256]).logits[:, -1]
        hits += (logits.argmax(-1) == want[s : s + 256]).sum().item()
    return hits / len(problems)


@torch.inference_mode()
def lm_loss(model: Any, tok: Any, texts: Sequence[str]) -> float:
    """Mean negative log-likelihood per word (nats), each text scored after an <eos> (as lm-eval's rolling)."""
    vocab = tok.get_vocab()
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([[tok.eos_token_id] + [vocab[w] for w in t.split()]])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        total -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return total / count


def quick_scores(model: Any, tok: Any, splits: world.Splits, which: str = "dev") -> dict[str, float]:
    return {
        "j_arith": arith_accuracy(model, tok, getattr(splits, f"j_arith_{which}"), "j"),
        "e_arith": arith_accuracy(model, tok, getattr(splits, f"e_arith_{which}"), "e"),
        "j_loss": lm_loss(model, tok, getattr(splits, f"j_text_{which}")),
    }


# ---------------------------------------------------------------------------- eval suite files


TEMPLATE_GEN = """\
# Shared by the zoo_arith_* tasks (written by `python -m dfs_merge.apps.zoo suites`, dfs_merge/apps/zoo/family.py).
# The question ends with the answer cue (`answer :` in E, `kotae :` in J); the answer is one number
# token in digits. Greedy, one token (the answer is one token), compared exactly.
dataset_path: json
custom_dataset: !function local_data.load
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
target_delimiter: " "
generation_kwargs:
  until: ["<eos>", ".", "。"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 1
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: '(\\d+)'
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TEMPLATE_ROLLING = """\
# Shared by the zoo_lm_* tasks (written by `python -m dfs_merge.apps.zoo suites`, dfs_merge/apps/zoo/family.py).
# Rolling log-likelihood of held-out J stories. The tokenizer is word-level, so
# ln(word_perplexity) is the loss in nats per token.
dataset_path: json
custom_dataset: !function local_data.load
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

TASK = """\
include: {template}
task: {task}
tag: [zoo_{split}]
dataset_kwargs:
  data_files:
    test: data/{task}.jsonl
"""


def write_suites(suite_dir: Path = SUITE_DIR) -> list[Path]:
    """Write the zoo's lm-eval tasks: YAML in `suite_dir`, JSONL in `suite_dir/data`."""
    s = world.make_splits()
    (suite_dir / "data").mkdir(parents=True, exist_ok=True)
    out = []

    for name, text in (("_template_zoo_arith.yaml", TEMPLATE_GEN), ("_template_zoo_lm.yaml", TEMPLATE_ROLLING)):
        (suite_dir / name).write_text(text, encoding="utf-8")
        out.append(suite_dir / name)

    def dump(task: str, rows: list[dict], template: str) -> None:
        data = suite_dir / "data" / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        yaml = suite_dir / f"{task}.yaml"
        yaml.write_text(TASK.format(template=template, task=task, split=task.rsplit("_", 1)[1]), encoding="utf-8")
        out.extend([yaml, data])

    for split in ("dev", "test"):
        for lang in ("j", "e"):
            probs = getattr(s, f"{lang}_arith_{split}")
            dump(f"zoo_arith_{lang}_{split}", [{"question": p.question(lang), "answer": str(p.answer)} for p in probs],
                 "_template_zoo_arith.yaml")
        dump(f"zoo_lm_j_{split}", [{"text": t} for t in getattr(s, f"j_text_{split}")], "_template_zoo_lm.yaml")
    return out


# ---------------------------------------------------------------------------- checks


ROUTES = {  # label -> route over sources [j, m]
    "frankenmerge": "0:0-3, 1:4-7",  # naive: J lower half + M upper half
    "route": HAND_ROUTE,  # J bottom -> M middle -> J top
    "route_mtop": "0:0-1, 1:2-7",  # J bottom -> M middle and top
    "m_layers": "1:0-7",  # all of M's layers under J's embeddings and head
}


def quick_table(zoo: Path = ZOO_DIR, splits_: Sequence[str] = ("dev", "test")) -> dict[str, dict[str, dict]]:
    """Direct scores (no lm-eval) of base, J, M, the parameter-space merges and hand-made routes."""
    from dfs_merge.genome import Route
    from dfs_merge.models.sources import SourcePool
    from dfs_merge.stitch import stitch

    torch.set_num_threads(1)
    s = world.make_splits()
    tok = make_tokenizer()
    models = {n: load(zoo / n) for n in ("base", "j", "m")}
    sds = {n: models[n].state_dict() for n in models}
    for kind in ("average", "task_arithmetic"):
        models[kind] = load(zoo / "base")
        models[kind].load_state_dict(merge_state(kind, sds["base"], sds["j"], sds["m"]))
    pool = SourcePool.load([str(zoo / "j"), str(zoo / "m")])
    for label, text in ROUTES.items():
        models[label] = stitch(pool, Route.parse(text))
    out: dict[str, dict[str, dict]] = {}
    for split in splits_:
        out[split] = {n: quick_scores(mdl, tok, s, split) for n, mdl in models.items()}
        out[split]["majority"] = {"j_arith": world.majority_answer(getattr(s, f"j_arith_{split}"))[1]}
    return out


def print_quick(table: dict[str, dict[str, dict]]) -> None:
    for split, rows in table.items():
        if split not in ("dev", "test"):
            continue
        print(f"{'model (' + split + ')':22s} j_arith  e_arith  j_loss")
        for k, v in rows.items():
            cells = [f"{v[c]:7.3f}" if c in v else "      -" for c in ("j_arith", "e_arith", "j_loss")]
            print(f"{k:22s} " + "  ".join(cells))


def record(zoo: Path = ZOO_DIR) -> dict[str, Any]:
    """Write `scores.json` in the zoo folder: weight digests and the direct scores."""
    data = {"sha256": {n: weights_digest(zoo / n) for n in ("base", "j", "m")}, **quick_table(zoo)}
    (zoo / SCORES).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def verify(rebuilt: Path, committed: Path = ZOO_DIR) -> bool:
    """Compare a retrained zoo with the committed one: weight digests, then direct scores."""
    want = json.loads((committed / SCORES).read_text())
    got = {"sha256": {n: weights_digest(rebuilt / n) for n in ("base", "j", "m")}, **quick_table(rebuilt)}
    ok = True
    for n, digest in want["sha256"].items():
        same = got["sha256"][n] == digest
        ok &= same
        print(f"{n}: weights {'identical' if same else 'DIFFER'} (sha256 {got['sha256'][n][:16]})")
    for split in ("dev", "test"):
        for n, row in want[split].items():
            for k, v in row.items():
                g = got[split][n][k]
                if abs(g - v) > 1e-6:
                    ok = False
                    print(f"{split} {n} {k}: committed {v:.4f}, rebuilt {g:.4f}")
    print("zoo reproduced" if ok else "zoo NOT reproduced")
    return ok


# ---------------------------------------------------------------------------- the README table (lm-eval)

RUNS = {  # table row -> run config (evolved with `run_evolution`, resumed when already finished), in this order
    "evolved DFS (J, M)": "genomes/zoo.yaml",
    "evolved DFS, scaling: none (J, M)": "genomes/zoo_noscale.yaml",
    "evolved PS: DARE-TIES per layer, CMA-ES, J arithmetic only (the paper's recipe)": "genomes/zoo_ps.yaml",
    "evolved PS under the J-loss guard": "genomes/zoo_ps_guard.yaml",
    "evolved hybrid: DFS over (evolved PS under the guard, J)": "genomes/zoo_ps_hybrid.yaml",
}
# DFS over the fixed task-arithmetic merge and J: genomes/zoo_hybrid.yaml; not in the default table:
# add {"evolved DFS over (task arithmetic, J)": "genomes/zoo_hybrid.yaml"}.
TEST_TASKS = {"zoo_arith_j_test": 1.0, "zoo_arith_e_test": 1.0, "zoo_lm_j_test": 1.0}


def lm_eval_table(zoo: Path = ZOO_DIR, runs: dict[str, str] | None = None, log: Callable[[str], Any] = print) -> str:
    """Evolve (or resume) each run of `runs`, then score every row on the test split with lm-eval: markdown."""
    from dfs_merge.config import load_config
    from dfs_merge.fitness.score import Fitness
    from dfs_merge.genome import Route
    from dfs_merge.genome_files import load_genome
    from dfs_merge.merging.blend import recipe_model
    from dfs_merge.merging.recipe import Recipe
    from dfs_merge.models.sources import SourcePool
    from dfs_merge.search.evolution import run_evolution
    from dfs_merge.stitch import stitch

    torch.set_num_threads(1)
    runs = RUNS if runs is None else runs
    if not (ROOT / "build" / "zoo" / "task_arithmetic" / "config.json").is_file():
        write_merge("task_arithmetic", ROOT / "build" / "zoo" / "task_arithmetic", zoo)
    fit = Fitness(TEST_TASKS, metrics={"zoo_lm_j_test": "word_perplexity"}, batch_size=64, max_length=256)
    tok = make_tokenizer()
    rows: list[tuple[str, Any, Any, int, str]] = []  # label, model, tokenizer, hops, note
    models = {n: load(zoo / n) for n in ("base", "j", "m")}
    for n, label in (("base", "base"), ("j", "J (J-language specialist)"), ("m", "M (math specialist)")):
        rows.append((label, models[n], tok, 8, ""))
    pool = SourcePool.load([str(zoo / "j"), str(zoo / "m")])
    rows.append(("naive frankenmerge: J layers 0-3 + M layers 4-7", stitch(pool, Route.parse(ROUTES["frankenmerge"])),
                 pool.tokenizer, 8, f"`{ROUTES['frankenmerge']}`"))
    rows.append(("hand-made route: J 0-1, M 2-5, J 6-7", stitch(pool, Route.parse(HAND_ROUTE)), pool.tokenizer, 8,
                 f"`{HAND_ROUTE}`"))
    sds = {n: models[n].state_dict() for n in models}
    for kind, label in (("average", "parameter space: average of J and M"),
                        ("task_arithmetic", "parameter space: task arithmetic (base + ΔJ + ΔM)")):
        mdl = load(zoo / "base")
        mdl.load_state_dict(merge_state(kind, sds["base"], sds["j"], sds["m"]))
        rows.append((label, mdl, tok, 8, ""))
    for label, cfg_path in runs.items():
        cfg = load_config(ROOT / cfg_path)
        run_evolution(cfg, resume=True, log=log)
        g = load_genome(Path(cfg.out) / "best.genome.yaml")
        route = g.check()
        rpool = SourcePool.load(list(g.sources))  # a recipe source (the hybrid's) is merged here
        if isinstance(g, Recipe):
            rows.append((label, recipe_model(g, rpool), rpool.tokenizer, g.layers, f"{g.text()} (seed {cfg.seed})"))
            continue
        scales = "" if cfg.scaling == "none" else f", scales {min(route.scales):.2f}-{max(route.scales):.2f}"
        rows.append((label, stitch(rpool, route), rpool.tokenizer, len(route),
                     f"`{route.text()}`{scales} (seed {cfg.seed})"))
    s = world.make_splits()
    _, majority = world.majority_answer(s.j_arith_test)
    lines = ["| model | J-arithmetic test acc. | E-arithmetic test acc. | J LM loss (nats/word) | hops | route |",
             "| --- | ---: | ---: | ---: | ---: | --- |",
             f"| majority baseline (always answer the most frequent) | {100 * majority:.1f} | | | | |"]
    for label, mdl, tk, hops, note in rows:
        ev = fit.score(mdl, tk, hops=hops)
        t = ev.tasks
        lines.append(f"| {label} | {100 * t['zoo_arith_j_test'].value:.1f} | {100 * t['zoo_arith_e_test'].value:.1f} "
                     f"| {math.log(t['zoo_lm_j_test'].value):.3f} | {hops} | {note} |")
        log(lines[-1])
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def main_zoo(argv: Sequence[str] | None = None) -> int:
    """`dfs-merge zoo {train,suites,check,verify}`: build, inspect and score the zoo."""
    ap = argparse.ArgumentParser(prog="dfs-merge zoo", description=main_zoo.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train zoo models (default: all three, in order)")
    t.add_argument("names", nargs="*", default=["base", "j", "m"])
    t.add_argument("--out", default=str(ZOO_DIR))
    t.add_argument("--steps", type=int, default=None, help="override the recipe's steps (for quick trials)")
    sub.add_parser("suites", help="write the zoo's eval-suite files")
    c = sub.add_parser("check", help="direct scores (no lm-eval) of the zoo models, merges and hand-made routes")
    c.add_argument("--zoo", default=str(ZOO_DIR))
    c.add_argument("--record", action="store_true", help=f"write {SCORES} (digests and scores) in the zoo folder")
    v = sub.add_parser("verify", help="compare a retrained zoo with the committed one")
    v.add_argument("rebuilt")
    m = sub.add_parser("merge", help="write a parameter-space merge of J and M")
    m.add_argument("kind", choices=["average", "task_arithmetic"])
    m.add_argument("--out", required=True)
    tb = sub.add_parser("table", help="evolve (or resume) the zoo runs and print the README table (lm-eval, test split)")
    tb.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        for n in args.names:
            train(n, Path(args.out), steps=args.steps)
    elif args.cmd == "suites":
        for p in write_suites():
            print(p.relative_to(ROOT))
    elif args.cmd == "check":
        print_quick(record(Path(args.zoo)) if args.record else quick_table(Path(args.zoo)))
    elif args.cmd == "verify":
        return 0 if verify(Path(args.rebuilt)) else 1
    elif args.cmd == "merge":
        print(write_merge(args.kind, Path(args.out)))
    elif args.cmd == "table":
        text = lm_eval_table()
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main_zoo(sys.argv[1:]))
