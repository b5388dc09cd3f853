"""LoRA adapters as sources (`BASE+ADAPTER`): merged with PEFT at load, sharing the base's untouched tensors,
named in genomes, model cards and mergekit configs; bad adapters refused in one line."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import assert_refused, run_cli, write_lora
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

IDS = torch.tensor([[1, 17, 33, 5, 99, 250, 7, 12]])


@pytest.fixture(scope="module")
def adapters(tiny_source_dirs, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny base and two adapters over it: J-like (bottom and top layers), M-like (middle layers)."""
    base = tiny_source_dirs[0]
    root = tmp_path_factory.mktemp("adapters")
    return base, write_lora(base, root / "j", 1, [0, 3]), write_lora(base, root / "m", 2, [1, 2])


def test_an_adapter_source_is_peft_merge_and_unload_and_shares_the_base(adapters):
    base, j, m = adapters
    pool = SourcePool.load([str(base), f"{base}+{j}", f"{base}+{m}"])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    for src, adapter in zip(pool.sources[1:], (j, m), strict=True):
        want = PeftModel.from_pretrained(copy.deepcopy(plain), str(adapter)).merge_and_unload()
        assert torch.equal(src.model(IDS).logits, want(IDS).logits)
        assert src.adapter == adapter.resolve() and src.folder == base.resolve()
    assert torch.equal(pool.base.model(IDS).logits, plain(IDS).logits)  # the base itself is untouched
    base_ptrs = {n: p.data_ptr() for n, p in pool.base.model.named_parameters()}
    j_ptrs = {n: p.data_ptr() for n, p in pool.sources[1].model.named_parameters()}
    own = {n for n in base_ptrs if j_ptrs[n] != base_ptrs[n]}
    assert own == {f"model.layers.{i}.{w}.weight" for i in (0, 3)
                   for w in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    # a route through both adapters' layers runs like any other
    route = Route.parse("1:0, 2:1-2, 1:3")
    assert torch.isfinite(stitch(pool, route)(IDS).logits).all()


@pytest.mark.slow
def test_a_genome_over_adapters_names_them_and_exports_what_it_stitched(adapters, tmp_path):
    base, j, m = adapters
    sources = [f"{base}+{j}", f"{base}+{m}"]
    g = Genome.from_route(Route.parse("0:0-1, 1:1-2, 0:3", [1.0, 1.1, 0.9, 1.0, 1.0]), sources, [4, 4], 2)
    save_genome(g, tmp_path / "g.genome.yaml")
    shown = run_cli("show", tmp_path / "g.genome.yaml")
    assert shown.code == 0 and f"+{j}" in shown.out and f"+{m}" in shown.out
    assert run_cli("export", tmp_path / "g.genome.yaml", "--out", tmp_path / "hf").code == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert str(j) in card and str(m) in card
    pool = SourcePool.load(sources)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = stitch(pool, g.decode())(IDS).logits
    assert torch.allclose(ours, exported(IDS).logits, rtol=1e-4, atol=1e-5)

    assert run_cli("export", tmp_path / "g.genome.yaml", "--format", "mergekit", "--out", tmp_path / "mk.yaml").code == 0
    mk = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    models = {s["model"] for sl in mk["slices"] for s in sl["sources"]}
    assert models == {f"{base.resolve()}+{j.resolve()}", f"{base.resolve()}+{m.resolve()}"}
    built = tmp_path / "mk-built"
    res = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(tmp_path / "mk.yaml"), str(built),
                          "--lora-merge-cache", str(tmp_path / "lora-cache"), "--allow-crimes"], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = AutoModelForCausalLM.from_pretrained(built).eval()(IDS).logits
    assert ((theirs - ours).abs().max() / ours.abs().max()) < 1e-4  # mergekit's own base+lora builds the same

    back = run_cli("import-mergekit", tmp_path / "mk.yaml", "--out", tmp_path / "back.genome.yaml")
    assert back.code == 0, back.err
    assert yaml.safe_load((tmp_path / "back.genome.yaml").read_text())["route"] == g.decode().text()


def test_sources_only_eval_scores_each_adapter(adapters, tiny_suite_dir, tmp_path):
    base, j, m = adapters
    cfg = {"sources": [str(base), f"{base}+{j}", f"{base}+{m}"], "tasks": {"tiny_mc": 1.0}, "limit": 3,
           "eval_suites": [str(tiny_suite_dir)], "max_length": 64, "out": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("eval", tmp_path / "c.yaml", "--sources-only")
    assert res.code == 0, res.err
    assert all(f"source {i}" in res.out for i in range(3))


def other_shape_adapter(tmp_path: Path) -> Path:
    """A LoRA adapter trained on a model of another width (hidden 64, not 48)."""
    other = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    return write_lora(other, tmp_path / "wide-lora", 3, [0], base_name="")  # no base named: shapes decide


@pytest.mark.parametrize("make, phrase", [
    (lambda a, t: shutil.copytree(a, t / "bin") and (t / "bin" / "adapter_model.safetensors").rename(
        t / "bin" / "adapter_model.bin") and t / "bin", "pickled"),
    (lambda a, t: shutil.copytree(a, t / "none") and (t / "none" / "adapter_model.safetensors").unlink() or t / "none",
     "no adapter_model.safetensors"),
    (lambda a, t: t / "absent", "no such adapter folder"),
    (lambda a, t: write_lora_config(a, t / "mods", target_modules=["no_such_proj"]), "does not fit its base"),
    (lambda a, t: write_lora_config(a, t / "kind", peft_type="IA3"), "only LoRA adapters"),
    (lambda a, t: write_lora_config(a, t / "named", base_model_name_or_path="org/another-model"), "trained on org/another-model"),
    (lambda a, t: other_shape_adapter(t), "does not fit its base"),
])
def test_a_bad_adapter_is_one_line_exit_2(adapters, tiny_suite_dir, tmp_path, make, phrase):
    base, j, _ = adapters
    bad = make(j, tmp_path)
    cfg = {"sources": [str(base), f"{base}+{bad}"], "tasks": {"tiny_mc": 1.0}, "limit": 3,
           "eval_suites": [str(tiny_suite_dir)], "max_length": 64, "out": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(run_cli("eval", tmp_path / "c.yaml", "--sources-only"), phrase)


def write_lora_config(adapter: Path, out: Path, **edits) -> Path:
    """A copy of `adapter` whose adapter_config.json has `edits`."""
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(edits)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_an_export_into_an_adapter_folder_is_refused(adapters, tmp_path):
    base, j, m = adapters
    g = Genome.from_route(Route.parse("0:0-3"), [f"{base}+{j}"], [4], 1)
    save_genome(g, tmp_path / "g.genome.yaml")
    before = sorted(p.name for p in j.iterdir())
    assert_refused(run_cli("export", tmp_path / "g.genome.yaml", "--out", j, "--force"), "is the input", str(j))
    assert sorted(p.name for p in j.iterdir()) == before
