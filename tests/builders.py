"""Builders for the tests: tiny tokenizers and Llama sources written as HF folders, tiny lm-eval suites,
demo-like configs. Deterministic and offline; `conftest.py` turns them into fixtures."""


from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfs_merge import CHECKOUT

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 48, 4, 4, 2, 320

CORPUS = """\
Alice was beginning to get very tired of sitting by her sister on the bank, and of having
nothing to do: once or twice she had peeped into the book her sister was reading, but it had
no pictures or conversations in it, and what is the use of a book, thought Alice, without
pictures or conversations? So she was considering in her own mind, as well as she could, for
the hot day made her feel very sleepy and stupid, whether the pleasure of making a daisy-chain
would be worth the trouble of getting up and picking the daisies, when suddenly a White Rabbit
with pink eyes ran close by her. There was nothing so very remarkable in that; nor did Alice
think it so very much out of the way to hear the Rabbit say to itself, Oh dear! Oh dear! I
shall be late! The cat sat on the mat. The dog ran to the park. The bird sang in the tree.
Question: 3 + 4 = ? Answer: 7. Question: 12 + 5 = ? Answer: 17. Question: 9 - 2 = ? Answer: 7.
Question: 20 + 22 = ? Answer: 42. Question: 8 + 1 = ? Answer: 9. 0 1 2 3 4 5 6 7 8 9 10 11
"""

# Tasks of the tiny suite: the same shapes as the bundled eval_suites (mc, ppl, gen).
MC_ROWS = [
    {"query": "The cat sat on the", "choices": ["mat", "sky", "tree", "river"], "gold": 0},
    {"query": "The dog ran to the", "choices": ["moon", "park", "book", "cup"], "gold": 1},
    {"query": "The bird sang in the", "choices": ["car", "bank", "tree", "shoe"], "gold": 2},
    {"query": "Alice was beginning to get very", "choices": ["blue", "loud", "round", "tired"], "gold": 3},
    {"query": "what is the use of a", "choices": ["book", "rabbit", "sister", "daisy"], "gold": 0},
    {"query": "a White Rabbit with pink", "choices": ["shoes", "eyes", "hats", "wings"], "gold": 1},
]
PPL_ROWS = [
    {"text": "Alice was beginning to get very tired of sitting by her sister on the bank."},
    {"text": "So she was considering in her own mind, as well as she could, for the hot day."},
    {"text": "There was nothing so very remarkable in that; nor did Alice think it so very much."},
    {"text": "The cat sat on the mat. The dog ran to the park. The bird sang in the tree."},
]
GEN_ROWS = [
    {"question": "3 + 4", "answer": "7"},
    {"question": "12 + 5", "answer": "17"},
    {"question": "9 - 2", "answer": "7"},
    {"question": "20 + 22", "answer": "42"},
    {"question": "8 + 1", "answer": "9"},
]

TINY_TASK_YAMLS = {
    "tiny_mc": """\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: data/tiny_mc.jsonl
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{query}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: gold
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1
        """,
    # the bundled prose template, with the data file read by lm-eval's json loader from this suite's folder
    "tiny_ppl": f"""\
        include: {CHECKOUT / "eval_suites" / "_template_prose_ppl.yaml"}
        task: tiny_ppl
        custom_dataset: null
        dataset_kwargs:
          data_files:
            test: data/tiny_ppl.jsonl
        """,
    "tiny_gen": """\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: data/tiny_gen.jsonl
        test_split: test
        fewshot_split: test
        num_fewshot: 2
        output_type: generate_until
        doc_to_text: "Question: {{question}} = ? Answer:"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["\\n", "."]
          do_sample: false
          max_gen_toks: 6
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: true
        metadata:
          version: 1
        """,
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines (one object a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_self_merge_config(folder: Path, source: Path, name: str, **overrides) -> str:
    """A demo-like config (one tiny source, repeats 2, nsga2 on [score, hops], the bundled prose and
    cloze tasks with few documents) written as `folder/name.yaml`; its run goes to `folder/name`."""
    import yaml

    cfg = {
        "sources": [str(source)],
        "repeats": 2,
        "scaling": "slot",
        "constraints": {"pin_ends": True, "min_hops": 2, "max_hops": 6},
        "tasks": {"prose_ppl_dev": 1.0, "cloze_mc_dev": 1.0},
        "report_tasks": ["prose_ppl_test", "cloze_mc_test"],
        "limit": {"prose_ppl_dev": 2, "cloze_mc_dev": 4},
        "report_limit": 3,
        "max_length": 256,
        "prefix_cache_mb": 64,
        "objectives": ["score", "hops"],
        "algorithm": "nsga2",
        "population": 4,
        "generations": 2,
        "seed": 0,
        "out": str(folder / name),
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def write_tiny_suite(folder: Path) -> Path:
    """Write the three tiny tasks (YAML + JSONL under `data/`) into `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data" / "tiny_mc.jsonl", MC_ROWS)
    write_jsonl(folder / "data" / "tiny_ppl.jsonl", PPL_ROWS)
    write_jsonl(folder / "data" / "tiny_gen.jsonl", GEN_ROWS)
    for name, text in TINY_TASK_YAMLS.items():
        (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
    return folder


# An answer-likelihood task on the bundled answer template (the family suites'), its data read from the suite's folder
TINY_LL_YAML = f"""\
    include: {CHECKOUT / "eval_suites" / "_template_family_arith.yaml"}
    task: tiny_ll
    custom_dataset: null
    dataset_kwargs:
      data_files:
        test: data/tiny_ll.jsonl
    doc_to_text: "Question: {{{{question}}}} = ? Answer:"
    """


def write_answer_task(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """Add the answer-likelihood task `tiny_ll` (the bundled answer template over `rows`) to a suite folder."""
    write_jsonl(folder / "data" / "tiny_ll.jsonl", rows)
    (folder / "tiny_ll.yaml").write_text(textwrap.dedent(TINY_LL_YAML))
    return folder


def build_tokenizer():
    """The tiny byte-level BPE tokenizer as a `PreTrainedTokenizerFast` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def tiny_llama_config(vocab_size: int):
    """The LlamaConfig every tiny source uses."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


IMAGE_TOKEN = "<image>"
VISION_SIZE, VISION_PATCH = 16, 8
"""The tiny LLaVA's pictures: 16 x 16 pixels in 8-pixel patches, so 4 image tokens in the text for each."""
IDEFICS3_TOKENS = ("<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
"""What Idefics3's (and SmolVLM's) processor writes around a picture's `<image>` tokens, one token each."""
GEMMA3_MARKS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
"""Gemma 3's image tokens, by the names its processor reads them from the tokenizer (`<start_of_image>` in a prompt
becomes the picture's `<image_soft_token>`s between the two marks)."""
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
"""The tiny Gemma 3's attention types: sliding and full layers in turn, so that a route mixes both."""
VLM_KINDS = ("llava", "idefics3", "smolvlm", "gemma3")
"""The tiny VLMs that the tests over every supported family build (`tiny_vlm`); LLaVA-NeXT's (`llava_next`), whose
language model and head sit where LLaVA's do, is tested on its own."""
IMAGE_TOKENS_PER_PICTURE = {"llava": 4, "idefics3": 20, "smolvlm": 20, "gemma3": 4}
"""The image tokens a `picture()` (32 x 32) becomes in the text, by kind: Idefics3's processor splits it into 2 x 2
tiles of 16 x 16 and adds the whole picture shrunk to one, 4 tokens each."""


def build_vlm_tokenizer(kind: str = "llava"):
    """The tiny tokenizer with the image tokens of a VLM of `kind` added (LLaVA's `IMAGE_TOKEN`, the last id;
    `IDEFICS3_TOKENS`; `GEMMA3_MARKS`, named): what the tiny VLM and the LLMs merged with it share."""
    tok = build_tokenizer()
    added = {"gemma3": GEMMA3_MARKS.values(), "idefics3": IDEFICS3_TOKENS, "smolvlm": IDEFICS3_TOKENS}
    tok.add_special_tokens({"additional_special_tokens": list(added.get(kind, [IMAGE_TOKEN]))})
    if kind != "gemma3":
        return tok
    return type(tok)(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token, eos_token=tok.eos_token,
                     pad_token=tok.pad_token, model_max_length=tok.model_max_length, extra_special_tokens=GEMMA3_MARKS)


def swap_tokens(tokenizer, a: int, b: int):
    """A copy of a fast tokenizer whose tokens at ids `a` and `b` trade places: the same strings, a reordered
    vocabulary (neither the original's nor a prefix of it)."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    first, second = (next(t for t, i in vocab.items() if i == k) for k in (a, b))
    vocab[first], vocab[second] = b, a
    return type(tokenizer)(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token=tokenizer.bos_token,
                           eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                           model_max_length=tokenizer.model_max_length)


def tiny_vlm_text_config(tokenizer, hidden: int = HIDDEN, kind: str = "llava"):
    """The config of the tiny VLM's language model and of the tiny LLM merged with it: the tiny sources' Llama (at
    `hidden` wide), a Gemma 3 text model of that shape for `gemma3` (sliding layers of an 8-token window between
    full ones, its embeddings tied to its head as Gemma 3's are); with an RMSNorm epsilon of 1e-10, so that a hop's
    scale folds into an export exactly to float32 rounding (the fold is exact but for the norm's epsilon,
    DESIGN.md: with 1e-6 and these tiny random weights, whose hidden states are small, it moves the logits by about
    1e-3)."""
    if kind == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                head_dim=hidden // HEADS, max_position_embeddings=512, rms_norm_eps=1e-10,
                                sliding_window=8, layer_types=GEMMA3_LAYER_TYPES, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
    text = tiny_llama_config(len(tokenizer))
    text.hidden_size, text.intermediate_size, text.rms_norm_eps = hidden, 2 * hidden, 1e-10
    return text


def random_gemma_weights(model):
    """`model` with its Gemma norms and Gemma 3's image projector random: Gemma initialises them to 0 (a norm
    multiplies by 1 + w, which hides a missing shift; a zero projector, a picture that changes nothing)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                torch.nn.init.normal_(p, std=0.2)
    return model


def tiny_vlm_llm(tokenizer, kind: str = "llava", seed: int = 1, hidden: int = HIDDEN):
    """A random tiny LLM of the tiny VLM's language model's family and shape (`tiny_vlm_text_config`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_vlm_text_config(tokenizer, hidden, kind)).eval()
    return random_gemma_weights(model) if kind == "gemma3" else model


def tiny_vlm(tokenizer, seed: int, hidden: int = HIDDEN, kind: str = "llava"):
    """A random tiny VLM of `kind` (float32) over a tiny language model of `hidden` (`tiny_vlm_text_config`), with
    its processor; a 1-layer vision tower of width 32 each:

    - `llava`: a CLIP tower (16 x 16 pictures, 8-pixel patches) and a projector; `llava_next`: a LLaVA-NeXT
      (`LlavaNextForConditionalGeneration`, any-resolution tiles of 16 x 16) instead;
    - `idefics3`, `smolvlm`: Idefics3's SigLIP tower (16 x 16 tiles of 4-pixel patches, 4 tokens each after the
      connector's pixel shuffle), pictures of up to 32 x 32 split into tiles plus the whole one; `tokenizer` from
      `build_vlm_tokenizer(kind)`. The SmolVLM's processor is Idefics3's, which expands a picture into the same
      tokens: SmolVLM's own needs `num2words` and torchvision (for its video processor), which are not installed;
    - `gemma3`: a SigLIP tower (16 x 16 pictures, 4-pixel patches pooled to 4 tokens) and Gemma 3's projector over
      a Gemma 3 text model; `tokenizer` from `build_vlm_tokenizer("gemma3")`."""
    import torch
    import transformers as tf

    text = tiny_vlm_text_config(tokenizer, hidden, kind)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(seed)
    if kind in ("idefics3", "smolvlm"):
        config, model_class = {"idefics3": (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration),
                               "smolvlm": (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration)}[kind]
        vision = tf.Idefics3VisionConfig(**tower, image_size=VISION_SIZE, patch_size=4)
        model = model_class(config(vision_config=vision, text_config=text, scale_factor=2,
                                   image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)))
        images = tf.Idefics3ImageProcessor(size={"longest_edge": 2 * VISION_SIZE},
                                           max_image_size={"longest_edge": VISION_SIZE})
        return model.eval(), tf.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4)
    if kind == "gemma3":
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_MARKS.items()}
        vision = tf.SiglipVisionConfig(**tower, image_size=VISION_SIZE, patch_size=4)
        model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
            vision_config=vision, text_config=text, mm_tokens_per_image=4, boi_token_index=ids["boi_token"],
            eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"]))
        images = tf.Gemma3ImageProcessor(size={"height": VISION_SIZE, "width": VISION_SIZE})
        processor = tf.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4)
        return random_gemma_weights(model).eval(), processor
    vision = tf.CLIPVisionConfig(**tower, image_size=VISION_SIZE, patch_size=VISION_PATCH, projection_dim=32)
    common = dict(vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-1,
                  image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                  vision_feature_select_strategy="default")
    sizes = dict(size={"shortest_edge": VISION_SIZE}, crop_size={"height": VISION_SIZE, "width": VISION_SIZE})
    if kind == "llava_next":
        grid = [[VISION_SIZE, VISION_SIZE], [VISION_SIZE, 2 * VISION_SIZE], [2 * VISION_SIZE, VISION_SIZE]]
        model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(**common, image_grid_pinpoints=grid))
        images, processor_class = tf.LlavaNextImageProcessor(**sizes, image_grid_pinpoints=grid), tf.LlavaNextProcessor
    else:
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
        images, processor_class = tf.CLIPImageProcessor(**sizes), tf.LlavaProcessor
    processor = processor_class(image_processor=images, tokenizer=tokenizer, patch_size=VISION_PATCH,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model.eval(), processor


def save_vlm(model, processor, folder: Path) -> Path:
    """Save a VLM (safetensors) and its processor (tokenizer, image processor) as an HF folder."""
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def save_vlm_sources(kind: str, root: Path) -> dict[str, Path]:
    """`vlm`: a random tiny VLM of `kind` (seed 0); `llm`: a random tiny LLM of its language model's family and
    shape with its tokenizer (seed 1); as HF folders under `root`."""
    tokenizer = build_vlm_tokenizer(kind)
    vlm, processor = tiny_vlm(tokenizer, seed=0, kind=kind)
    return {"vlm": save_vlm(vlm, processor, root / "vlm"),
            "llm": save_source(tiny_vlm_llm(tokenizer, kind), tokenizer, root / "llm")}


def picture(rgb: tuple[int, int, int] = (220, 30, 30), size: int = 32):
    """A PIL picture: a white square with a coloured disc, for image + text inputs."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=rgb)
    return img


def train_sentencepiece(folder: Path, **options: Any) -> Path:
    """A tiny SentencePiece BPE model with byte fallback (vocabulary 400), trained on the built-in text plus a little
    Japanese, written as `folder / "tokenizer.model"`; `options` go to the trainer (special ids and pieces, ...)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text((CORPUS + "\n日本語の文章です。東京は大きい。\n") * 3)
    settings = dict(vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   **{**settings, **options})
    return folder / "tokenizer.model"


def save_source(model, tokenizer, folder: Path) -> Path:
    """Save a model (safetensors) and tokenizer as an HF folder."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def train_briefly(model, tokenizer, steps: int = 40, seed: int = 0) -> None:
    """A few seconds of next-token training on the built-in corpus, enough to beat uniform by far."""
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor(tokenizer(CORPUS)["input_ids"])
    seq, batch = 32, 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@dataclass
class CliResult:
    """What one `dfs-merge` command did: its exit code and what it printed."""

    code: int
    out: str
    err: str


def run_cli(*argv: str) -> CliResult:
    """Run `dfs-merge ARGV` in this process (an uncaught exception propagates: that is a traceback)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from dfs_merge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code if isinstance(exc.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
"""Whether the suite runs as root (CI does), for whom file permissions do not apply: see `run_cli_unprivileged`."""
_FILE_CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3}
"""The Linux capabilities (linux/capability.h) by which root passes file permission checks."""


def _drop_file_capabilities(prctl: Any) -> None:
    """In the child, before exec: drop root's file capabilities from its bounding set, so that the program it
    execs (uid 0, whose permitted set is the bounding set) gets the permission checks any user gets."""
    for cap in _FILE_CAPABILITIES.values():
        if prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP (linux/prctl.h)
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


def run_unprivileged(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `args` with file permissions enforced. As root (CI), in a child whose capabilities to bypass file
    permissions (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER) are dropped before exec: still uid 0, it is refused a
    folder of mode 0o555 or a file of mode 0 that root owns, as their owner would be. (Switching to `nobody` is
    not enough here: the interpreter may live under root's 0o700 home, as a pyenv one does.) Otherwise as is."""
    preexec = None
    if ROOT_USER:
        libc = ctypes.CDLL(None, use_errno=True)  # here, not in the child: nothing is loaded between fork and exec
        prctl = libc.prctl

        def preexec() -> None:
            _drop_file_capabilities(prctl)

    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec, check=False)


def run_cli_unprivileged(*argv: Any, timeout: float = 300) -> CliResult:
    """`dfs-merge ARGV` with file permissions enforced: in this process for an ordinary user, in a child process
    without root's file capabilities for root (`run_unprivileged`)."""
    if not ROOT_USER:
        return run_cli(*argv)
    done = run_unprivileged([sys.executable, "-m", "dfs_merge.cli", *map(str, argv)], timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def message_lines(err: str) -> list[str]:
    """The lines of stderr that say what went wrong: without progress bars (tqdm's lines of `\r` updates)
    and without the stage lines of a command's progress (`export: loading 2 sources ...`)."""
    lines = []
    for line in err.splitlines():
        last = line.split("\r")[-1].strip()
        if last and not re.search(r"\d+/\d+ \[[^\]]*(it|eval|tensor)/s\]$|\d+%\||^export: ", last):
            lines.append(last)
    return lines


def assert_refused(result: CliResult, *phrases: str) -> None:
    """Exit code 2, at most 3 lines on stderr besides progress bars, no traceback, each phrase in the message."""
    lines = message_lines(result.err)
    assert result.code == 2, (result.code, result.err[-2000:])
    assert "Traceback" not in result.err and 1 <= len(lines) <= 3, result.err[-2000:]
    for phrase in phrases:
        assert phrase in result.err, (phrase, result.err)


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: to show that a refused command wrote nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block blocks longer than `seconds`."""
    def expire(*_: Any) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_lora(base_dir: Path, out: Path, seed: int, layers: list[int], modules=("q_proj", "v_proj", "down_proj"),
               base_name: str | None = None) -> Path:
    """A random (non-zero) PEFT LoRA adapter over the model in `base_dir` (r 4 on `modules` of `layers`), saved
    with safetensors in `out`; `base_name` replaces the base it records (`base_model_name_or_path`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(modules), layers_to_transform=layers,
                     init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    if base_name is not None:
        config = json.loads((out / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def mergekit_yaml(cfg: Path, out: Path) -> Path:
    """Build `cfg` as `mergekit-yaml cfg out` does (its options' defaults, on the CPU, quiet), in this process."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = cfg.read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(quiet=True, device="cpu"), config_source=text)
    return out


def mergekit_writes_full_attention_layer_types(monkeypatch: Any) -> None:
    """mergekit 0.1.5 under transformers 5 writes a model of a new depth with the base's `layer_types` (one entry
    per base layer: a config transformers refuses to load). Patched to what the header note of
    `write_mergekit_config` tells its users to write: every layer full attention, one entry per output layer."""
    import mergekit.merge

    original = mergekit.merge._model_out_config

    def fixed(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.layer_types = ["full_attention"] * out.num_hidden_layers
        return out

    monkeypatch.setattr(mergekit.merge, "_model_out_config", fixed)
