"""Writing a route (or a parameter-space recipe's merge) as one GGUF file, for llama.cpp, Ollama and LM Studio.

`export_gguf` writes the same model as the HF export (`dfs_merge.export.checkpoint`): the tensors that
`plan_tensors` lists, each hop's layer folded by `FoldedLayers` (the running product of hop scales divided
out of its residual writers, by the family's own `fold_scale`), renamed to llama.cpp's names
(`gguf.TensorNameMap`), stored as F32, F16, BF16 or Q8_0 (`gguf.quants`; one-dimensional tensors, the norms
and biases, stay F32, and a matrix whose rows are not a multiple of Q8_0's 32-value block falls back to F16,
as llama.cpp's own converter does). The hyperparameters and the base's tokenizer (a byte-level or SentencePiece
BPE vocabulary with token types, merges, scores where SentencePiece has them, special token ids, whether BOS/EOS are added, the chat template) go
into the metadata, with the genome as JSON under `dfs_merge.genome`.

The file is written with `gguf.GGUFWriter` into a hidden temporary sibling of the target
(`dfs_merge.atomic.atomic_path`): header, metadata and tensor index first, then the tensors one at a
time, so the output is never held in memory. With `verify` it is then loaded back by transformers' GGUF
loader and compared with the stitched model (logits on the fixed verify batch, `verify_export`, within
the tolerance of its tensor type, `QUANTS`) and its tokenizer with the base's (encode and decode of
`ROUND_TRIP_TEXTS`); only then is it renamed into place. A failed or killed export leaves nothing under
the target's name.

What a GGUF file written here can express, and what is refused in one line (`ExportError`): the Llama
family's `llama`, `mistral` (written as llama.cpp's `llama`, as its converter does: llama.cpp attends over
the whole context, so a Mistral sliding window is dropped, with a warning), `qwen2` and `qwen3` (only with
`head_dim` 128, the one transformers' GGUF loader assumes), and Gemma 3's text model (`gemma3_text`, as
llama.cpp's `gemma3`: its norms stored as `1 + weight`, the sliding window and head_dim in the metadata;
`_check_gemma3` lists the settings that neither llama.cpp nor transformers' GGUF loader reads from a file and
that must therefore be Gemma 3's standard ones, and `_check_route` the layer pattern a route must keep); not
any other family, not rope scaling, not sliding-window layers outside Gemma 3's fixed pattern, not Llama
attention or MLP biases; a byte-level BPE tokenizer whose pre-tokenizer has a llama.cpp name
(`PRE_TOKENIZERS`) or a SentencePiece BPE with byte fallback (Llama 2's, Mistral v0.1's, Gemma's: llama.cpp's
`llama` vocabulary with scores and token types).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dfs_merge.atomic import NO_SPACE, atomic_path
from dfs_merge.errors import ExportError, SourceError, one_line
from dfs_merge.export.pool import check_pool, written_pool
from dfs_merge.export.progress import Progress
from dfs_merge.export.tensors import Entry, FoldedLayers, plan_tensors, running_products
from dfs_merge.export.verify import VERIFY_PROMPTS, VerifyResult, verify_export
from dfs_merge.genome_files import genome_to_dict
from dfs_merge.models.sources import SourcePool, locate, read_config
from dfs_merge.outputs import check_output
from dfs_merge.route import Route

if TYPE_CHECKING:
    from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from dfs_merge.export.formats import ExportOptions
    from dfs_merge.genome_files import CandidateGenome

__all__ = ["ARCHITECTURES", "QUANTS", "ROUND_TRIP_TEXTS", "GgufVerifyResult", "Quant", "check_quant",
           "export_gguf", "precheck", "precheck_gguf", "verify_gguf", "write"]

log = logging.getLogger(__name__)

GENOME_KEY = "dfs_merge.genome"


@dataclass(frozen=True)
class Quant:
    """One `--quant`: the file type it declares, the type of its matrices, and the verify tolerance."""

    name: str
    file_type: str  # a gguf.LlamaFileType member name
    tensor_type: str  # a gguf.GGMLQuantizationType member name, for 2-D tensors
    tolerance: float  # the largest max|Δlogit|/max|logit| against the stitched model that verifies


# Tolerances: max|Δlogit|/max|logit| of the file read back by transformers against the stitched model, measured
# on a 9-hop route with scales 0.8-1.25 over the tiny random Llamas (hidden 48; hidden 64 for Q8_0 on every
# matrix) and on SmolLM2-135M deepened to 40 hops (0-19 + 10-29, scales 0.8 and 1.2), then bounded with margin:
#   F32  2.5e-4 tiny (the HF export's own: the fold through RMSNorm's eps), 1.9e-6 SmolLM2; bit-equal to the HF export
#   F16  7.6e-4 tiny, 1.5e-3 SmolLM2;  BF16 6.3e-3 tiny, 1.0e-2 SmolLM2;  Q8_0 1.5e-2 tiny, 2.9e-2 SmolLM2
QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("f32", "ALL_F32", "F32", 1e-3),
    Quant("f16", "MOSTLY_F16", "F16", 5e-3),
    Quant("bf16", "MOSTLY_BF16", "BF16", 5e-2),
    Quant("q8_0", "MOSTLY_Q8_0", "Q8_0", 0.1),
)}


@dataclass(frozen=True)
class Architecture:
    """How one `model_type` is written: llama.cpp's architecture, whether q/k rows are permuted, what is added
    to the norm weights, whether head_dim is always written, and llama.cpp's sliding-window pattern."""

    arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's llama rope pairs interleaved dimensions: HF's q/k rows are reordered
    norm_shift: float = 0.0  # added to every `*norm.weight`: Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by w
    head_dim_key: bool = False  # attention.key_length / value_length written even when head_dim = hidden / heads
    swa_pattern: int = 0  # every n-th layer full attention, the others sliding (llama.cpp's fixed pattern); 0: none


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LLAMA", True),
    "mistral": Architecture("LLAMA", True),
    "qwen2": Architecture("QWEN2", False),
    "qwen3": Architecture("QWEN3", False, head_dim_key=True),
    "gemma3_text": Architecture("GEMMA3", False, norm_shift=1.0, head_dim_key=True, swa_pattern=6),
}

# llama.cpp's `tokenizer.ggml.pre` for the byte-level pre-tokenizers it implements, keyed on the shape of
# tokenizer.json's `pre_tokenizer` (`_pre_tokenizer_key`).
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+regex",): "gpt-2",  # the ByteLevel pre-tokenizer's own split is GPT-2's
    ("digits", "bytelevel+regex"): "smollm",
    (f"split:{_LLAMA3_REGEX}", "bytelevel"): "llama-bpe",
    (f"split:{_QWEN2_REGEX}", "bytelevel"): "qwen2",
}

# encoded and decoded by the written file's tokenizer and by the base's: the ids and the text must agree
ROUND_TRIP_TEXTS = (
    *VERIFY_PROMPTS,
    "Hello, world! It's 2024: 3.14159 and 1,000,000 items.",
    "  two leading spaces,\ttabs\tand\nnew\n\nlines   ",
    "naïve café, Grüße, 日本語, emoji 🚀🦙",
)
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6
"""gguf.TokenType's values."""
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # a SentencePiece byte-fallback piece


def check_quant(quant: str) -> Quant:
    """The `Quant` named `quant`; any other name is an ExportError listing the supported ones."""
    q = QUANTS.get(str(quant).lower())
    if q is None:
        raise ExportError(f"--quant {quant}: not a GGUF type this export writes; one of {', '.join(QUANTS)}")
    return q


def precheck_gguf(genome: CandidateGenome, quant: str) -> None:
    """The checks that need no weights, before any source is loaded: the quantisation, the base's architecture."""
    check_quant(quant)
    try:
        config, _ = read_config(locate(genome.sources[0]))
    except SourceError:
        return  # loading the sources says what is wrong with them
    _check_config(config, warn=False)


def export_gguf(
    pool: SourcePool,
    genome: CandidateGenome,
    out: str | Path,
    *,
    quant: str = "f16",
    force: bool = False,
    verify: bool = True,
    progress: bool | Progress = False,
) -> Path:
    """Write `genome`'s route over `pool` (or a parameter-space recipe's merge of it) as one GGUF file `out`.

    An existing `out` is refused unless `force`, an input never replaced. With `verify` the written file is
    loaded back with transformers and checked (`verify_gguf`) before it is renamed into place; a mismatch is
    an ExportError and nothing is left under `out`'s name. Returns `out`.
    """
    show = Progress.of(progress)
    q = check_quant(quant)
    route = genome.check()
    check_pool(pool, genome)
    _check_config(pool.base.model.config)
    out = check_output(out, kind="file", force=force, inputs=[*genome.sources, *pool.paths], error=ExportError,
                       what=None, force_hint="force=True (--force)")
    written = written_pool(pool, genome, show)
    _check_route(written, route)
    _check_settings(genome)
    if written.tokenizer is None:
        raise ExportError("the base has no tokenizer: a GGUF file carries its vocabulary, so it cannot be written")
    vocab = _vocab(written.tokenizer, int(written.base.model.config.vocab_size))
    try:
        with atomic_path(out) as tmp:
            _write(written, genome, route, q, vocab, tmp, out.stem, show)
            if verify:
                with show.stage(f"verifying {q.name} GGUF through transformers on {len(VERIFY_PROMPTS)} prompts",
                                "verified"):
                    result = verify_gguf(written, route, tmp, q)
                    log.info("verify: %s", result.text())
                    check_gguf_verified(result, q)
                show.say(f"verify: {result.text()}")
            if not force and out.exists():  # made by someone else while this one was written and verified
                raise ExportError(f"{out}: appeared while exporting; pass force=True (--force) to replace it")
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        # atomic_path removes its temporary file on the way out: `out` appears only when complete
        raise ExportError(f"no space left on {out.parent}; nothing was published: free some space and export "
                          "again") from None
    return out


def precheck(genome: CandidateGenome, options: ExportOptions) -> None:
    """`dfs-merge export --format gguf`, before any source is loaded: `precheck_gguf` (default quant f16)."""
    precheck_gguf(genome, options.quant or "f16")


def write(genome: CandidateGenome, out: Path, options: ExportOptions, progress: Progress) -> Path:
    """`dfs-merge export --format gguf`: the sources loaded in `options.dtype` (default float32), then
    `export_gguf` (verified unless `options.verify` is off)."""
    dtype = options.dtype or "float32"
    with progress.loading(len(genome.sources), options.device, dtype):
        pool = SourcePool.load(list(genome.sources), device=options.device, dtype=dtype)
    return export_gguf(pool, genome, out, quant=options.quant or "f16", force=options.force,
                       verify=options.verify != "off", progress=progress)


# --------------------------------------------------------------------------- what a GGUF can express


def _check_config(config: PretrainedConfig, warn: bool = True) -> None:
    """Refuse, in one line, a base whose architecture or settings this GGUF writer cannot express (and, with
    `warn`, say what it drops)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"--format gguf: architecture {model_type!r} cannot be written as GGUF here; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"--format gguf: {model_type} with rope scaling {rope.get('rope_type')!r} is not written "
                          f"(transformers' GGUF loader reads no rope scaling back); only plain rope is")
    if model_type in ("llama", "mistral") and (getattr(config, "attention_bias", False)
                                               or getattr(config, "mlp_bias", False)):
        raise ExportError(f"--format gguf: a {model_type} with attention or MLP biases is not written (transformers' "
                          f"GGUF loader reads them back without)")
    if model_type == "qwen3" and _head_dim(config) != 128:
        raise ExportError(f"--format gguf: a qwen3 with head_dim {_head_dim(config)} is not written (transformers' "
                          f"GGUF loader assumes 128)")
    if model_type == "gemma3_text":
        _check_gemma3(config)
    if warn and model_type == "mistral" and getattr(config, "sliding_window", None):
        log.warning("GGUF: written as llama.cpp's llama architecture, which attends over the whole context: the "
                    "sliding window of %s tokens is dropped", config.sliding_window)


# Gemma 3's settings that a gemma3 GGUF file has no key for: llama.cpp hard-codes them (llama-model.cpp) and
# transformers' GGUF loader takes Gemma3TextConfig's defaults, so a model is written only where it has these values.
_GEMMA3_FIXED: dict[str, Any] = {
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
    "use_bidirectional_attention": False,
}
_GEMMA3_SCALAR = 256  # transformers' query_pre_attn_scalar; llama.cpp scales attention by 1/sqrt(head_dim) instead
_GEMMA3_SLIDING_THETA = 10000.0  # the sliding layers' rope base, in both
_GEMMA3_27B_BLOCKS = 62  # llama.cpp takes a gemma3 file of 62 blocks for Gemma 3 27B, scaled by 1/sqrt(hidden/heads)


def _check_gemma3(config: PretrainedConfig) -> None:
    """Refuse, in one line, a Gemma 3 whose file would be read back as another model: a setting off `_GEMMA3_FIXED`,
    an attention scale other than 1/sqrt(256) = 1/sqrt(head_dim), sliding layers' rope other than plain rope at
    base 10000, or no sliding window."""
    for key, fixed in _GEMMA3_FIXED.items():
        value = getattr(config, key, fixed)
        if value != fixed and not (fixed is False and not value):  # None is off too
            raise ExportError(f"--format gguf: a gemma3 with {key} {value!r} is not written (a gemma3 GGUF file has "
                              f"no key for it: llama.cpp and transformers' GGUF loader assume {fixed!r})")
    head_dim, scalar = _head_dim(config), getattr(config, "query_pre_attn_scalar", _GEMMA3_SCALAR)
    if not head_dim == scalar == _GEMMA3_SCALAR:
        raise ExportError(f"--format gguf: a gemma3 with head_dim {head_dim} and query_pre_attn_scalar {scalar} is not "
                          f"written (llama.cpp scales attention by 1/sqrt(head_dim), transformers' GGUF loader by "
                          f"1/sqrt({_GEMMA3_SCALAR}): no key carries the scalar, so both must be {_GEMMA3_SCALAR})")
    local = _rope_parameters(config, "sliding_attention")
    if local.get("rope_type", "default") not in ("default", None) or \
            float(local.get("rope_theta", _GEMMA3_SLIDING_THETA)) != _GEMMA3_SLIDING_THETA:
        raise ExportError(f"--format gguf: a gemma3 whose sliding layers' rope is {local.get('rope_type')} with base "
                          f"{local.get('rope_theta')} is not written (a gemma3 GGUF file has no key for it: llama.cpp "
                          f"and transformers' GGUF loader assume plain rope with base {_GEMMA3_SLIDING_THETA:g})")
    if not getattr(config, "sliding_window", None):
        raise ExportError("--format gguf: a gemma3 without a sliding window is not written (llama.cpp requires "
                          "gemma3.attention.sliding_window)")


def _check_route(pool: SourcePool, route: Route) -> None:
    """Refuse a route whose attention types per hop a GGUF file of the base's architecture cannot express."""
    config = pool.base.model.config
    spec = ARCHITECTURES[config.model_type]
    types = [pool.layer_type(h.source, h.layer) for h in route]
    if not spec.swa_pattern:
        sliding = [k for k, t in enumerate(types) if t != "full_attention"]
        if sliding:
            raise ExportError(f"--format gguf: hops {sliding[:5]} are sliding-window layers, which a GGUF file of "
                              f"this architecture cannot mark per layer")
        return
    n = spec.swa_pattern
    wrong = [k for k, t in enumerate(types) if t != ("full_attention" if (k + 1) % n == 0 else "sliding_attention")]
    if wrong:
        k = wrong[0]
        raise ExportError(f"--format gguf: hop {k} ({route[k].source}:{route[k].layer}) is {types[k]}, but a "
                          f"{spec.arch.lower()} GGUF file makes every {n}th layer full attention and the others "
                          f"sliding (llama.cpp and transformers' GGUF loader fix the pattern; no key sets it), "
                          f"{len(wrong)} hop(s) differ; export an HF checkpoint, which writes layer_types per hop")
    scale = config.hidden_size // config.num_attention_heads
    if spec.arch == "GEMMA3" and len(route) == _GEMMA3_27B_BLOCKS and scale != config.query_pre_attn_scalar:
        raise ExportError(f"--format gguf: a gemma3 file of {_GEMMA3_27B_BLOCKS} blocks is read by llama.cpp as Gemma 3 "
                          f"27B, whose attention is scaled by 1/sqrt(hidden/heads) = 1/sqrt({scale}), not this "
                          f"model's 1/sqrt({config.query_pre_attn_scalar}); a route of another length is written")


def _rope_parameters(config: PretrainedConfig, layer_type: str = "full_attention") -> dict[str, Any]:
    """The config's rope parameters (of `layer_type`'s layers where they are given per layer type, as Gemma 3's)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    if isinstance(rope, dict) and "rope_type" not in rope and "type" in rope:
        rope = {**rope, "rope_type": rope["type"]}
    return rope if isinstance(rope, dict) else {}


def _rope_theta(config: PretrainedConfig) -> float:
    theta = _rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _head_dim(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _check_settings(genome: CandidateGenome) -> None:
    """Refuse what a GGUF file of this writer cannot carry yet: a tokenizer or chat template other than the base's."""
    given = genome.settings()
    if given.get("tokenizer_source"):
        raise ExportError(f"--format gguf writes the base's tokenizer, but the genome takes its tokenizer from source "
                          f"{given['tokenizer_source']}; export an HF checkpoint instead (dfs-merge export --out DIR)")
    if given.get("chat_template") is not None:
        raise ExportError("--format gguf writes the base's chat template, but the genome sets chat_template; export "
                          "an HF checkpoint instead (dfs-merge export --out DIR)")


# --------------------------------------------------------------------------- the tokenizer


@dataclass(frozen=True)
class _Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE, byte fallback)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece's piece scores (llama.cpp merges by them)
    add_space_prefix: bool | None  # SentencePiece: a "▁" put before the text
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _vocab(tok: PreTrainedTokenizerBase, vocab_size: int) -> _Vocab:
    """The metadata of the base's tokenizer, llama.cpp's way, one token per embedding row: a byte-level BPE
    (GPT-2's, Llama 3's, Qwen's: `tokenizer.ggml.model = gpt2` with its pre-tokenizer's llama.cpp name) or a
    SentencePiece BPE with byte fallback (Llama 2's, Mistral v0.1's: `llama`, with piece scores and token
    types, the byte pieces typed BYTE). The merges are written in both cases (transformers' GGUF loader reads
    them; llama.cpp merges a SentencePiece vocabulary by its scores)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"--format gguf: the base's tokenizer ({type(tok).__name__}) is not a fast tokenizer; "
                          f"only byte-level or SentencePiece BPE tokenizers are written")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if not sentencepiece and (model.get("type") != "BPE" or decoder.get("type") != "ByteLevel"):
        raise ExportError(f"--format gguf: the base's tokenizer is neither byte-level BPE nor SentencePiece BPE with "
                          f"byte fallback ({model.get('type')} model, {decoder.get('type')} decoder)")
    if sentencepiece:
        pre = "default"
    else:
        key = _pre_tokenizer_key(spec.get("pre_tokenizer"))
        found = PRE_TOKENIZERS.get(key)
        if found is None:
            raise ExportError(f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(key)[:120]}) has no llama.cpp "
                              f"name here; known: {', '.join(PRE_TOKENIZERS.values())}")
        pre = found
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"--format gguf: the tokenizer has ids up to {max(vocab.values())}, past the model's "
                          f"{vocab_size} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    unk = getattr(tok, "unk_token_id", None)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # an embedding row no token uses: llama.cpp's placeholder
            types.append(_TOKEN_UNUSED)
        elif i in added and not (sentencepiece and i == unk):
            # llama.cpp matches added tokens as written, so a token normalised by the tokenizer is stored normalised
            text = by_id[i] if not added[i].normalized else tok.decode(tok.encode(by_id[i], add_special_tokens=False))
            tokens.append(text)
            types.append(_TOKEN_CONTROL if added[i].special else _TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_TOKEN_UNKNOWN if sentencepiece and i == unk else
                         _TOKEN_BYTE if sentencepiece and _BYTE_TOKEN.fullmatch(by_id[i]) else _TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    special_ids = {k: int(v) for k, v in special.items() if isinstance(v, int) and 0 <= v < vocab_size}
    probe = tok("a")["input_ids"]
    add_bos = bool(probe) and "bos" in special_ids and probe[0] == special_ids["bos"]
    add_eos = bool(probe) and "eos" in special_ids and probe[-1] == special_ids["eos"]
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    scores = _piece_scores(tok, tokens, types) if sentencepiece else None
    space = _space_prefix(spec) if sentencepiece else None
    return _Vocab("llama" if sentencepiece else "gpt2", tokens, types, scores, space, merges, pre, special_ids,
                  add_bos, add_eos, template)


def _piece_scores(tok: PreTrainedTokenizerBase, tokens: Sequence[str], types: Sequence[int]) -> list[float]:
    """SentencePiece's score of each piece, from the tokenizer's `tokenizer.model` when it came with one (as
    llama.cpp's converter reads them), else the BPE rank (-id) of each normal piece and 0 for the others."""
    path = getattr(tok, "vocab_file", None)
    if isinstance(path, str) and Path(path).is_file():
        try:
            import sentencepiece
        except ImportError:
            pass
        else:
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
            n = sp.get_piece_size()
            if all(sp.id_to_piece(i) == t for i, t in enumerate(tokens[:n])):
                return [float(sp.get_score(i)) if i < n else 0.0 for i in range(len(tokens))]
    return [-float(i) if kind == _TOKEN_NORMAL else 0.0 for i, kind in enumerate(types)]


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the SentencePiece tokenizer puts "▁" before the text: a Metaspace pre-tokenizer that prepends, or
    (the older layout) a normalizer that prepends it."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    steps = [*pre.get("pretokenizers", [pre]), *norm.get("normalizers", [norm])]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" or
               s.get("type") == "Prepend" for s in steps if isinstance(s, dict))


def _pre_tokenizer_key(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """The shape of tokenizer.json's pre-tokenizer, one word per step (`split:<regex>` for a Split)."""
    if not pre:
        return ("none",)
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    out = []
    for s in steps:
        kind = s.get("type", "?")
        if kind == "ByteLevel":
            out.append("bytelevel+regex" if s.get("use_regex", True) and not s.get("add_prefix_space") else
                       "bytelevel" if not s.get("add_prefix_space") else "bytelevel+prefix")
        elif kind == "Digits":
            out.append("digits" if s.get("individual_digits") else "digits-grouped")
        elif kind == "Split":
            pattern = s.get("pattern") or {}
            out.append(f"split:{pattern.get('Regex', pattern.get('String', ''))}")
        else:
            out.append(kind.lower())
    return tuple(out)


# --------------------------------------------------------------------------- writing


def _write(pool: SourcePool, genome: CandidateGenome, route: Route, q: Quant, vocab: _Vocab, path: Path, name: str,
           show: Progress) -> None:
    """The GGUF file at `path`: metadata and tensor index, then the tensors streamed one at a time."""
    import gguf

    config = pool.base.model.config
    spec = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, spec.arch, None)
    if arch is None:
        raise ExportError(f"--format gguf: the installed gguf library has no {spec.arch.lower()} architecture; "
                          f"upgrade it (pip install -U gguf)")
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, pool, genome, route, q, vocab, name)
    plan = _tensor_plan(pool, route, arch, q)
    for gname, _, ttype, shape, nbytes in plan:
        np_dtype = {"F32": np.float32, "F16": np.float16}.get(ttype.name, np.uint8)
        writer.add_tensor_info(gname, shape, np_dtype, nbytes, raw_dtype=ttype)
    total = sum(p[4] for p in plan)
    kinds = sorted({p[2].name for p in plan})
    layers = FoldedLayers(pool, route, running_products(route))
    try:
        writer.open_output_file(path)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with show.stage(f"writing {len(route)} hops as GGUF {q.name}: {len(plan)} tensors ({', '.join(kinds)}), "
                        f"{total / 2**20:.0f} MB", "wrote the GGUF file"), show.bar(len(plan), "tensor") as bar:
            for gname, e, ttype, _, nbytes in plan:
                t = layers.tensor(e)  # a hop's folded layer tensor, or its embed / head source's
                data = _encode(t, gname, ttype, config, spec)
                if data.nbytes != nbytes:
                    raise ExportError(f"{gname}: {data.nbytes} bytes encoded, {nbytes} planned")
                writer.write_tensor_data(data)
                bar.update(1)
        writer.flush()
    except OSError as err:
        raise ExportError(f"cannot write {path.name}: {one_line(err)}") from None
    finally:
        writer.close()


def _write_metadata(writer: GGUFWriter, pool: SourcePool, genome: CandidateGenome, route: Route, q: Quant, vocab: _Vocab,
                    name: str) -> None:
    import gguf

    config = pool.base.model.config
    writer.add_type(gguf.GGUFType.MODEL)
    # transformers' loader reads a `llama` file named exactly "mistral" as an architecture gguf has no tensor names for
    writer.add_name(name if name != "mistral" else f"{name} (dfs-merge)")
    writer.add_description(f"dfs-merge export: {route.text()} ({len(route)} hops) over {', '.join(genome.sources)}")
    licenses = {s.license for s in pool.sources if getattr(s, "license", None)}
    if len(licenses) == 1:
        writer.add_license(next(iter(licenses)))
    writer.add_block_count(len(route))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    spec = ARCHITECTURES[config.model_type]
    if head_dim != config.hidden_size // config.num_attention_heads or spec.head_dim_key:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec.swa_pattern:
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_file_type(gguf.LlamaFileType[q.file_type])
    if q.tensor_type not in ("F32", "F16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    writer.add_string(GENOME_KEY, json.dumps(genome_to_dict(genome), separators=(",", ":")))


def _tensor_plan(pool: SourcePool, route: Route, arch: MODEL_ARCH,
                 q: Quant) -> list[tuple[str, Entry, GGMLQuantizationType, tuple[int, ...], int]]:
    """(GGUF name, entry, tensor type, GGUF shape, bytes) of every tensor, in the HF export's order."""
    import gguf

    names = gguf.get_tensor_name_map(arch, len(route))
    wanted = gguf.GGMLQuantizationType[q.tensor_type]
    plan, fallback = [], []
    for e in plan_tensors(pool, route):
        gname = names.get_name(e.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"--format gguf: tensor {e.name} has no {gguf.MODEL_ARCH_NAMES[arch]} GGUF name")
        ttype = wanted if len(e.shape) > 1 else gguf.GGMLQuantizationType.F32
        if e.shape[-1] % gguf.GGML_QUANT_SIZES[ttype][0]:  # rows must be whole blocks: F16 instead, as llama.cpp does
            fallback.append(gname)
            ttype = gguf.GGMLQuantizationType.F16
        block, size = gguf.GGML_QUANT_SIZES[ttype]
        nbytes = int(np.prod(e.shape)) // block * size
        shape = e.shape if ttype.name in ("F32", "F16") else gguf.quant_shape_to_byte_shape(e.shape, ttype)
        plan.append((gname, e, ttype, tuple(shape), nbytes))
    if fallback:
        log.info("GGUF: %d of %d matrices have rows that are not whole %s blocks of %d values, written as F16 "
                 "(e.g. %s)", len(fallback), sum(len(p[1].shape) > 1 for p in plan), wanted.name,
                 gguf.GGML_QUANT_SIZES[wanted][0], fallback[0])
    return plan


def _encode(t: torch.Tensor, gname: str, ttype: GGMLQuantizationType, config: PretrainedConfig,
            spec: Architecture) -> np.ndarray:
    """One tensor as the bytes GGUF stores: float32, q/k rows permuted for llama.cpp's rope, norms shifted as
    llama.cpp's converter does (`Architecture.norm_shift`), then quantised."""
    import gguf

    data = t.detach().to("cpu", torch.float32).numpy()
    if spec.permute_qk and gname.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = config.num_attention_heads if ".attn_q." in gname else config.num_key_value_heads
        data = _permute_rope(data, int(heads))
    if spec.norm_shift and gname.endswith("norm.weight"):
        data = data + np.float32(spec.norm_shift)
    return gguf.quants.quantize(np.ascontiguousarray(data), ttype)


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rope pairs dimension i with i + d/2 within each head; llama.cpp's `llama` pairs 2i with 2i + 1.
    Reorder each head's rows from (half, pair) to (pair, half): the inverse of transformers' GGUF loader."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class GgufVerifyResult:
    """The GGUF file read back by transformers: its logits against the stitched model, its tokenizer's round trip."""

    logits: VerifyResult
    tokenizer_problem: str | None  # the first text whose ids or decoding differ; None when all agree

    def text(self) -> str:
        tok = "tokenizer round trip equal" if self.tokenizer_problem is None else self.tokenizer_problem
        return f"{self.logits.text()}; {tok}"


def verify_gguf(pool: SourcePool, route: Route, path: str | Path, quant: str | Quant = "f16") -> GgufVerifyResult:
    """Load the GGUF file with transformers (model and tokenizer) and compare it with the stitched model and
    the base's tokenizer."""
    q = quant if isinstance(quant, Quant) else check_quant(quant)
    path = Path(path)
    result = verify_export(pool, route, path.parent, q.tolerance, gguf_file=path.name)
    return GgufVerifyResult(result, _round_trip(pool.tokenizer, path))


def _round_trip(tok: PreTrainedTokenizerBase, path: Path) -> str | None:
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # noqa: BLE001
        return f"the GGUF tokenizer does not load ({one_line(err)})"
    texts = [*ROUND_TRIP_TEXTS, *(f"{t} x {t}" for t in (tok.bos_token, tok.eos_token) if t)]
    for text in texts:
        a, b = tok(text)["input_ids"], loaded(text)["input_ids"]
        if a != b:
            return f"tokenizer differs on {text[:40]!r}: ids {a[:12]} vs {b[:12]}"
        da, db = tok.decode(a), loaded.decode(b)
        if da != db:
            return f"tokenizer decodes {text[:40]!r} differently: {da[:40]!r} vs {db[:40]!r}"
    return None


def check_gguf_verified(result: GgufVerifyResult, q: Quant) -> None:
    """Refuse a GGUF file whose logits miss its type's tolerance or whose tokenizer differs from the base's.
    Differing greedy generations are only logged: in 16-bit and 8-bit types they are near-ties."""
    r = result.logits
    if r.problem is not None:
        raise ExportError(f"verify failed: {r.problem} (a NaN or inf scale or weight?); nothing was written")
    if not r.rel_error <= q.tolerance:
        raise ExportError(f"verify failed: the GGUF file's logits differ from the stitched model's, {r.text()} "
                          f"(tolerance {q.tolerance:g} for {q.name}); nothing was written")
    if result.tokenizer_problem is not None:
        raise ExportError(f"verify failed: {result.tokenizer_problem}; nothing was written")
    if r.generations_equal is False:
        log.warning("verify: greedy generations differ in %s (near-ties); logits agree: %s", q.name, r.text())
