"""Loading sources: the pool, compatibility checks, and one-line errors from the API and the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import HIDDEN, message_lines, save_source, swap_tokens, tiny_llama_config

from dfs_merge.cli import main
from dfs_merge.errors import ExportError, GenomeError, IncompatibleSources, SourceError
from dfs_merge.genome import Hop, Route, seed_genomes
from dfs_merge.genome_files import load_genome, save_genome
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch


@pytest.fixture(scope="module")
def odd_sources(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Sources that must be refused next to the tiny Llama: wider, another family, a reordered vocabulary."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("odd")
    cfg = tiny_llama_config(len(tiny_tokenizer))
    wide = tiny_llama_config(len(tiny_tokenizer))
    wide.hidden_size = cfg.hidden_size * 2
    gemma_cfg = Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=4, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
    )
    other_tok = swap_tokens(tiny_tokenizer, 100, 101)
    dirs = {
        "wide": save_source(LlamaForCausalLM(wide), tiny_tokenizer, root / "wide"),
        "gemma": save_source(Gemma3ForCausalLM(gemma_cfg), tiny_tokenizer, root / "gemma"),
        "other_tok": save_source(LlamaForCausalLM(cfg), other_tok, root / "other_tok"),
    }
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    dirs["not_a_model"] = root / "not_a_model"
    pickled = root / "pickled"
    save_source(LlamaForCausalLM(cfg), tiny_tokenizer, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    dirs["pickled"] = pickled
    return dirs


def test_pool_exposes_layers_and_loads_a_self_merge_once(tiny_source_dirs):
    a, b = (str(p) for p in tiny_source_dirs)
    pool = SourcePool.load([a, b, a])
    assert pool.layers_per_source == (4, 4, 4)
    assert pool.sources[0].model is pool.sources[2].model
    assert pool.sources[1].model is not pool.sources[0].model
    assert pool.layer(2, 3) is pool.layer(0, 3)
    assert pool.tokenizer.pad_token is not None
    assert all(not p.requires_grad for p in pool.base.model.parameters())


def test_identity_route_over_loaded_folder_matches_plain_load(tiny_source_dirs, tiny_pool):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_source_dirs[0])
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    model = stitch(tiny_pool, Route(tuple(Hop(0, i) for i in range(4))))
    assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize(
    ("second", "error", "message"),
    [
        ("wide", IncompatibleSources, f"sources 0 and 1 differ in hidden_size: {HIDDEN} vs {2 * HIDDEN}"),
        ("gemma", IncompatibleSources, r"sources 0 and 1 differ in family: llama \(llama\) vs gemma3 \(gemma3_text\)"),
        ("other_tok", IncompatibleSources, r"^sources 0 and 1 differ in tokenizer at token id 100: '¤' vs '¥' "),
        ("not_a_model", SourceError, r"not a Hugging Face model folder \(no config.json\)"),
        ("pickled", SourceError, r"no .safetensors weights"),
    ],
)
def test_incompatible_or_unusable_sources_are_refused(tiny_source_dirs, odd_sources, second, error, message):
    with pytest.raises(error, match=message):
        SourcePool.load([str(tiny_source_dirs[0]), str(odd_sources[second])])


@pytest.fixture(scope="module")
def extended_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose tokenizer is the tiny one with two tokens appended, and a row for each in its embeddings and
    head: the tiny sources' vocabulary (320) is a prefix of its (322), as a base's is of a fine-tune's that added
    special tokens."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("extended")
    tok = type(tiny_tokenizer).from_pretrained(save_source(LlamaForCausalLM(tiny_llama_config(320)), tiny_tokenizer,
                                                           root / "tmp"))
    tok.add_tokens(["<extra>", "<more>"])
    torch.manual_seed(5)
    return save_source(LlamaForCausalLM(tiny_llama_config(len(tok))), tok, root / "extended")


def test_llms_whose_vocabularies_are_in_a_prefix_relation_share_a_pool(extended_dir, tiny_source_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from dfs_merge.export.checkpoint import export_genome
    from dfs_merge.export.mergekit.recipe import write_recipe_config
    from dfs_merge.genome import Genome
    from dfs_merge.merging.blend import Blender
    from dfs_merge.merging.recipe import Recipe
    from dfs_merge.models.vocab import VocabMap

    paths = [str(extended_dir), str(tiny_source_dirs[1])]
    pool = SourcePool.load(paths)
    assert pool.vocab == VocabMap((322, 320), (True, False), 320)
    recipe = Recipe(tuple(paths), 4, "task_arithmetic", 0, 1, ((0.5,),))
    merged = Blender(pool).apply(recipe)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        base, other = pool.base.model.get_parameter(name), pool.sources[1].model.get_parameter(name)
        assert torch.allclose(merged.get_parameter(name)[:320], base[:320] + 0.5 * (other - base[:320]), atol=1e-6)
        assert torch.equal(merged.get_parameter(name)[320:], base[320:])
    with pytest.raises(ExportError, match=r"^sources 0 and 1 differ in vocab_size \(322 vs 320\): .* mergekit config "
                                          r"cannot say; export an HF checkpoint instead \(--format hf\)$"):
        write_recipe_config(recipe, tmp_path / "recipe.yaml")

    genome = Genome.from_route(Route.parse("0:0-1, 1:1-2, 0:3"), paths, [4, 4], 2)
    out = export_genome(genome, tmp_path / "route")  # streamed from the folders, verified against the stitched model
    ids = torch.tensor([[1, 40, 41, 42, 321, 320]])  # the two appended tokens too: rows only the base has
    with torch.no_grad():
        want = stitch(pool, genome.check())(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert want.shape[-1] == 322 and torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    shorter_ends = dataclasses.replace(genome, embed_source=1)  # refused before a file is written, verified or not
    with pytest.raises(GenomeError, match=r"^embed_source 1: source 1's vocabulary \(320 rows\) is not the base's"):
        export_genome(shorter_ends, tmp_path / "ends", verify="off")
    assert not (tmp_path / "ends").exists()

    reverse = SourcePool.load(paths[::-1])  # the shorter vocabulary as the base: the same shared rows
    assert reverse.vocab == VocabMap((320, 322), (True, False), 320)
    assert Blender(reverse).apply(Recipe(tuple(paths[::-1]), 4, "task_arithmetic", 0, 1, ((0.5,),))) \
        .get_parameter("lm_head.weight").shape == (320, HIDDEN)


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no such model folder"):
        SourcePool.load([str(tmp_path / "nope" / "model")])


def test_unsupported_architecture_is_named(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = save_source(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tiny_tokenizer))), tiny_tokenizer, tmp_path / "gpt2")
    with pytest.raises(SourceError, match=r"unsupported architecture 'gpt2'; supported: .*llama"):
        SourcePool.load([str(folder)])


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_show_prints_route(tmp_path, tiny_source_dirs, capsys):
    from dfs_merge.genome import Genome

    g = seed_genomes(Genome.empty([str(p) for p in tiny_source_dirs], (4, 4), 2))[0]
    path = tmp_path / "g.yaml"
    save_genome(g, path)
    code, out, _ = run_cli("show", str(path), "--png", str(tmp_path / "route.png"), capsys=capsys)
    assert code == 0
    assert "route: 0:0-3" in out and "hops: 4" in out
    assert (tmp_path / "route.png").stat().st_size > 1000
    assert load_genome(path) == g


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("format: dfs-merge/genome@1\nsources: [{path: a, layers: 4}]\nbits: '101'\n", "bits: expected 4"),
        ("format: dfs-merge/genome@1\nsources: [{path: a, layers: 4}]\nbits: '0000'\nconstraints: {pin_ends: false}\n", "zero hops"),
        ("name: not a genome\n", "not a dfs-merge genome"),
    ],
)
def test_cli_bad_genome_is_one_line_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run_cli("show", str(path), capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("dfs-merge: error:")


def test_cli_export_with_missing_sources_is_one_line(tmp_path, capsys):
    path = tmp_path / "g.genome.yaml"
    path.write_text(f"format: dfs-merge/genome@1\nsources: [{{path: {tmp_path / 'gone'}, layers: 4}}]\nroute: 0:0-3\n")
    code, _, err = run_cli("export", str(path), "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and "no such model folder" in err and len(message_lines(err)) == 1


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).parent / "dfs-merge"
    proc = subprocess.run([str(exe), "show", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dfs-merge: error: {tmp_path / 'missing.yaml'}: no such file"


def test_cli_eval_prints_the_task_table_and_refuses_unknown_tasks(tmp_path, tiny_source_dirs, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"sources: [{tiny_source_dirs[0]}]\ntasks: {{cloze_mc_dev: 1.0, prose_ppl_dev: 1.0}}\nlimit: 2\nmax_length: 256\n"
    )
    code, out, _ = run_cli("eval", str(cfg), capsys=capsys)
    assert code == 0
    assert "cloze_mc_dev" in out and "acc" in out and "prose_ppl_dev" in out and "bits_per_byte" in out
    cfg.write_text(f"sources: [{tiny_source_dirs[0]}]\ntasks: {{no_such_task: 1.0}}\n")
    code, _, err = run_cli("eval", str(cfg), capsys=capsys)
    assert code == 2 and "no_such_task" in err and err.count("\n") == 1
