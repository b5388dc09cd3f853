"""GGUF export of Gemma 3 (text): llama.cpp's `gemma3` (norms stored as 1 + w, the sliding window and head_dim in
the metadata, a SentencePiece vocabulary with byte fallback) read back by transformers' GGUF loader with the HF
export's logits and the source tokenizer's ids; what a gemma3 file cannot express is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import save_source, train_sentencepiece

from dfs_merge.errors import ExportError
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.export.gguf import QUANTS, export_gguf
from dfs_merge.genome import ConstraintsConfig, Genome, Route
from dfs_merge.models.families import family_for
from dfs_merge.models.sources import Source, SourcePool

LAYERS = 6  # one period of Gemma 3's pattern: layers 0-4 slide, layer 5 attends globally
# a repeated block (0:4-5 twice), both sources, hop scales other than 1; hop 5 and hop 11 are full-attention layers
ROUTE = "0:0-5, 1:1-4, 0:4-5"
SCALES = [1.0, 1.0, 1.25, 1.0, 1.0, 1.0, 0.8, 1.0, 1.0, 1.1, 1.0, 0.9]
TEXTS = ["Hello, world! It's 3.14 and 1,000 items.", "日本語の文章です。東京は大きい。", "emoji 🚀🦙 and ñ",
         "  two  spaces,\ttabs\nand lines", "<start_of_turn>user\nThe cat sat<end_of_turn>", "<bos> x <eos> <pad>"]


def gemma3_config(vocab_size: int, **overrides):
    """A tiny Gemma 3 with the standard settings a gemma3 GGUF file assumes (head_dim = query_pre_attn_scalar = 256),
    and a sliding window of 8 tokens, shorter than the verify batch, so that sliding and full layers differ."""
    from transformers import Gemma3TextConfig

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=256, max_position_embeddings=512,
                    sliding_window=8, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return Gemma3TextConfig(**{**settings, **overrides})


def random_gemma3(config, seed: int):
    """Random float32 weights, the norms too (Gemma initialises them to 0, where 1 + w hides a missing shift)."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture(scope="module")
def gemma_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny SentencePiece BPE tokenizer with Gemma's conventions: <pad> 0, <eos> 1, <bos> 2, <unk> 3, user-defined
    pieces, no dummy prefix, whitespace kept, byte fallback; loaded as transformers' GemmaTokenizer."""
    root = tmp_path_factory.mktemp("gemma-spm")
    train_sentencepiece(root, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>",
                                                                                    "<end_of_turn>"],
                        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
                        split_digits=True)
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False}))
    return root


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_tokenizer_dir)


@pytest.fixture(scope="module")
def gemma_dirs(gemma_tokenizer_dir, gemma_tokenizer, tmp_path_factory) -> list[str]:
    """Two tiny random Gemma 3 sources saved with the tokenizer and its tokenizer.model (as a Gemma repo has it)."""
    dirs = []
    for seed in (0, 1):
        folder = save_source(random_gemma3(gemma3_config(len(gemma_tokenizer)), seed), gemma_tokenizer,
                             tmp_path_factory.mktemp("gemma3") / f"source{seed}")
        (folder / "tokenizer.model").write_bytes((gemma_tokenizer_dir / "tokenizer.model").read_bytes())
        dirs.append(str(folder))
    return dirs


@pytest.fixture(scope="module")
def gemma_pool(gemma_dirs) -> SourcePool:
    return SourcePool.load(gemma_dirs)


@pytest.fixture(scope="module")
def one_gemma(gemma_dirs) -> SourcePool:
    """The first source alone."""
    return SourcePool.load(gemma_dirs[:1])


def genome(dirs: list[str], route: str = ROUTE, scales: list[float] | None = None) -> Genome:
    return Genome.from_route(Route.parse(route, scales if scales is not None else SCALES), dirs, [LAYERS] * len(dirs), 2)


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def rel_err(ref, model, tok) -> float:
    """max|Δlogit|/max|logit| on the texts and a 32-token id sequence (past the sliding window of 8)."""
    inputs = [*(tok(t, return_tensors="pt")["input_ids"] for t in TEXTS),
              torch.tensor([[(3 + 37 * i) % len(tok) for i in range(32)]])]
    a = [ref(input_ids=x).logits for x in inputs]
    b = [model(input_ids=x).logits for x in inputs]
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) / max(float(x.abs().max()) for x in a)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_identity_route_reads_back_with_the_hf_exports_logits(quant, one_gemma, gemma_dirs, tmp_path):
    """The source itself (0:0-5): metadata as llama.cpp's converter writes it, the norms stored as 1 + w."""
    from gguf import GGUFReader

    g = genome(gemma_dirs[:1], "0:0-5", [1.0] * LAYERS)
    pool = one_gemma
    hf = load_hf(export_checkpoint(pool, g, tmp_path / "hf"))
    out = export_gguf(pool, g, tmp_path / "m.gguf", quant=quant)  # verified before it is published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]
    model = load_gguf(out)
    err = rel_err(hf, model, pool.tokenizer)
    assert err == 0.0 if quant == "f32" else err <= QUANTS[quant].tolerance
    assert model.config.layer_types == hf.config.layer_types and model.config.tie_word_embeddings
    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "gemma3" and fields["gemma3.block_count"] == LAYERS
    assert fields["gemma3.attention.sliding_window"] == 8 and fields["gemma3.attention.key_length"] == 256
    assert fields["gemma3.attention.value_length"] == 256 and fields["gemma3.rope.freq_base"] == 1e6
    assert fields["gemma3.context_length"] == 512 and fields["gemma3.attention.head_count_kv"] == 1
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 1 + 1 + LAYERS * 13  # embeddings, final norm, layers
    assert {tensors[n].tensor_type.name for n in tensors if n.endswith("norm.weight")} == {"F32"}
    source = pool.sources[0].model.model
    for gname, weight in [("blk.0.attn_k_norm.weight", source.layers[0].self_attn.k_norm.weight),
                          ("blk.5.post_ffw_norm.weight", source.layers[5].post_feedforward_layernorm.weight),
                          ("output_norm.weight", source.norm.weight)]:
        assert torch.equal(torch.from_numpy(tensors[gname].data.copy()), weight + 1.0), gname


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_stitched_route_with_a_repeat_and_hop_scales(quant, gemma_pool, gemma_dirs, tmp_path):
    """12 hops over both sources, a block repeated, scales folded into the post-norms: the HF export's logits, and
    the same sliding / full layer per hop as the HF export's layer_types."""
    g = genome(gemma_dirs)
    hf = load_hf(export_checkpoint(gemma_pool, g, tmp_path / "hf"))
    out = export_gguf(gemma_pool, g, tmp_path / "m.gguf", quant=quant)
    model = load_gguf(out)
    assert model.config.num_hidden_layers == 12 and model.config.layer_types == hf.config.layer_types
    assert model.config.layer_types.count("full_attention") == 2
    err = rel_err(hf, model, gemma_pool.tokenizer)
    assert err == 0.0 if quant == "f32" else err <= QUANTS[quant].tolerance


def test_tokenizer_ids_on_ascii_japanese_and_emoji(one_gemma, gemma_dirs, gemma_tokenizer_dir, tmp_path):
    """llama.cpp's `llama` vocabulary as its Gemma 3 converter writes it (scores from tokenizer.model, types, no space
    prefix, BOS added): transformers' GGUF tokenizer gives the source tokenizer's ids and text."""
    import sentencepiece as spm
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    g = genome(gemma_dirs[:1], "0:0-5", [1.0] * LAYERS)
    out = export_gguf(one_gemma, g, tmp_path / "m.gguf", verify=False)
    fields = {k: f.contents() for k, f in GGUFReader(str(out)).fields.items() if k.startswith("tokenizer.")}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_eos_token"] is False
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("padding", "eos", "bos", "unknown")] == [0, 1, 2, 3]
    sp = spm.SentencePieceProcessor(model_file=str(gemma_tokenizer_dir / "tokenizer.model"))
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    types = fields["tokenizer.ggml.token_type"]
    assert types[:7] == [3, 3, 3, 2, 3, 4, 4]  # <pad> <eos> <bos> control, <unk>, <mask>; the two user-defined pieces
    assert fields["tokenizer.ggml.tokens"][7] == "<0x00>" and set(types[7:263]) == {6}
    source = one_gemma.tokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS:
        ids = source(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == source.decode(ids), text
        assert loaded.decode(ids, skip_special_tokens=True) == source.decode(ids, skip_special_tokens=True), text
    assert any(types[i] == 6 for i in source("🚀")["input_ids"])  # the emoji take the byte fallback


def test_a_route_off_gemma3s_layer_pattern_is_refused(one_gemma, gemma_dirs, tmp_path):
    """A gemma3 file cannot say which layers slide: llama.cpp and transformers make every 6th layer full."""
    g = genome(gemma_dirs[:1], "0:0-5, 0:5", [1.0] * 7)  # hop 6 is layer 5, full attention, where the file slides
    with pytest.raises(ExportError, match=r"hop 6 \(0:5\) is full_attention, but a gemma3 GGUF file makes every "
                                          r"6th layer full attention .*export an HF checkpoint"):
        export_gguf(one_gemma, g, tmp_path / "m.gguf")
    deep = Route.parse(", ".join(["0:0-5"] * 10 + ["0:0-1"]))  # 62 hops on the pattern: llama.cpp reads Gemma 3 27B
    g = Genome.from_route(deep, gemma_dirs[:1], [LAYERS], 11, constraints=ConstraintsConfig(pin_ends=False))
    assert len(g.decode()) == 62
    with pytest.raises(ExportError, match=r"62 blocks is read by llama.cpp as Gemma 3 27B.*1/sqrt\(32\)"):
        export_gguf(one_gemma, g, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("overrides", "phrase"), [
    (dict(head_dim=16), r"a gemma3 with head_dim 16 and query_pre_attn_scalar 256 is not written \(llama.cpp scales "
                        r"attention by 1/sqrt\(head_dim\), transformers' GGUF loader by 1/sqrt\(256\)"),
    (dict(query_pre_attn_scalar=128, head_dim=128), r"a gemma3 with head_dim 128 and query_pre_attn_scalar 128"),
    (dict(final_logit_softcapping=30.0), r"a gemma3 with final_logit_softcapping 30.0 is not written \(a gemma3 GGUF "
                                         r"file has no key for it"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
     r"gemma3_text with rope scaling 'linear' is not written"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}),
     r"a gemma3 whose sliding layers' rope is default with base 20000.0 is not written"),
])
def test_settings_a_gemma3_file_does_not_carry_are_refused(overrides, phrase, gemma_tokenizer, tmp_path):
    pool = SourcePool([Source("gemma-in-memory", random_gemma3(gemma3_config(len(gemma_tokenizer), **overrides), 0),
                              family_for("gemma3_text"))], gemma_tokenizer)
    g = Genome.from_route(Route.parse("0:0-5"), ["gemma-in-memory"], [LAYERS], 2)
    with pytest.raises(ExportError, match=r"^--format gguf: .*" + phrase) as err:
        export_gguf(pool, g, tmp_path / "m.gguf")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
