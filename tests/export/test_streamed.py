"""The streamed export (tensors read from the sources' safetensors files): equal to the in-memory one, the genome's
settings honoured (dtypes, embeddings and head sources, tokenizer, chat template), the CLI's flags, the default
verification refusing a broken file, the model card's front matter."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from builders import assert_refused, message_lines, run_cli

from dfs_merge.errors import ExportError, SourceError
from dfs_merge.export import checkpoint as export
from dfs_merge.export.checkpoint import TOKENIZER_FILES, export_checkpoint, export_genome, stream_folders
from dfs_merge.export.providers import read_header
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome

ROUTE = "0:0-2, 1:1-3, 0:1-3"
SCALES = [1.0, 1.25, 1.0, 0.8, 1.0, 1.1, 1.0, 0.9, 1.0]


def genome(dirs: list[Path], **settings) -> Genome:
    g = Genome.from_route(Route.parse(ROUTE, SCALES), [str(d) for d in dirs], [4, 4], 2)
    return dataclasses.replace(g, **settings)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_streamed_export_equals_the_in_memory_one_bit_for_bit(tiny_pool, tiny_source_dirs, tmp_path):
    g = genome(tiny_source_dirs)
    assert stream_folders(g) == list(tiny_source_dirs)
    streamed = export_genome(g, tmp_path / "streamed", max_shard_size="200KB")
    in_memory = export_checkpoint(tiny_pool, g, tmp_path / "memory", max_shard_size="200KB")
    a, b = tensors(streamed), tensors(in_memory)
    assert a.keys() == b.keys() and len(a) == 3 + 9 * 9
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in in_memory.glob("*.safetensors"))
    for name in shards:  # one planner, one writer: the very same files
        assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name
    for name in ("config.json", export.INDEX_NAME):
        assert json.loads((streamed / name).read_text()) == json.loads((in_memory / name).read_text()), name
    assert "2 prompts" in (streamed / "README.md").read_text()

    # a sharded checkpoint (an index, several files) streams as a source too: its identity route is itself
    again = export_genome(Genome.from_route(Route.parse("0:0-8"), [str(streamed)], [9], 1), tmp_path / "again")
    c = tensors(again)
    assert c.keys() == a.keys() and all(torch.equal(c[k], a[k]) for k in a)


def test_out_dtype_bfloat16_writes_bf16_tensors_and_a_config_that_says_so(tiny_source_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_genome(genome(tiny_source_dirs, out_dtype="bfloat16"), tmp_path / "bf16")
    written = tensors(out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert "written in: bfloat16" in (out / "README.md").read_text()


def test_dtype_is_what_the_merge_computes_in(tiny_source_dirs, tmp_path):
    """dtype bfloat16 with out_dtype float32 (mergekit's pair): float32 tensors holding bfloat16 values."""
    from safetensors import safe_open

    out = export_genome(genome(tiny_source_dirs, dtype="bfloat16", out_dtype="float32"), tmp_path / "out")
    written = tensors(out)
    assert {t.dtype for t in written.values()} == {torch.float32}
    with safe_open(str(tiny_source_dirs[1] / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(written["model.layers.3.self_attn.q_proj.weight"], q.to(torch.bfloat16).float())
    assert not torch.equal(q.to(torch.bfloat16).float(), q)


def test_embed_and_head_sources_are_honoured(tiny_source_dirs, tmp_path):
    from safetensors import safe_open

    out = export_genome(genome(tiny_source_dirs, embed_source=1, head_source=0), tmp_path / "out")  # verified
    written = tensors(out)
    for source, key in ((1, "model.embed_tokens.weight"), (0, "model.norm.weight"), (0, "lm_head.weight")):
        with safe_open(str(tiny_source_dirs[source] / "model.safetensors"), "pt") as f:
            assert torch.equal(written[key], f.get_tensor(key)), key


def test_max_shard_size_splits_shards_with_a_valid_index(tiny_source_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    save_genome(genome(tiny_source_dirs), tmp_path / "g.yaml")
    result = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "out", "--max-shard-size", "100KB")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    index = json.loads((out / export.INDEX_NAME).read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 3 and all(f.stat().st_size < 100_000 + 2**16 or len(read_header(f)) == 1 for f in files)
    held = {name: f.name for f in files for name in read_header(f)}
    assert index["weight_map"] == held
    sizes = {name: torch.Size(shape).numel() * 4 for f in files for name, (_, shape) in read_header(f).items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert len(AutoModelForCausalLM.from_pretrained(out).model.layers) == 9
    refused = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "other", "--max-shard-size", "lots")
    assert_refused(refused, "max_shard_size", "lots")
    assert not (tmp_path / "other").exists()


def test_no_copy_tokenizer_leaves_no_tokenizer_files(tiny_source_dirs, tmp_path):
    save_genome(genome(tiny_source_dirs, chat_template="chatml"), tmp_path / "g.yaml")
    result = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "out", "--no-copy-tokenizer")
    assert result.code == 0, result.err
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & set(TOKENIZER_FILES), names
    assert {"config.json", "model.safetensors", "README.md"} <= names


def test_chat_template_and_tokenizer_source(tiny_source_dirs, tmp_path):
    from transformers import AutoTokenizer

    text = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    out = export_genome(genome(tiny_source_dirs, chat_template=text, tokenizer_source=1), tmp_path / "jinja")
    assert (out / "chat_template.jinja").read_text() == text
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).chat_template == text
    named = export_genome(genome(tiny_source_dirs, chat_template="chatml"), tmp_path / "chatml", verify="off")
    assert "<|im_start|>" in (named / "chat_template.jinja").read_text()


def _corrupting_writer(real, tensor: str):
    """`save_shard` that writes the shard, then flips one byte of `tensor`'s data in it."""

    def write(path, specs, get, *args):
        real(path, specs, get, *args)
        header = read_header(path)
        if tensor not in header:
            return
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        start = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"][0] + 8 + n
        with open(path, "r+b") as f:
            f.seek(start + 5)
            f.write(bytes([raw[start + 5] ^ 0x40]))

    return write


BESIDE = pytest.mark.parametrize("beside", [False, True], ids=["busy machine", "free core"])
"""Both ways the verification runs: the stitched model's side when the check asks for it (a busy machine), or in
a thread beside the writing (a free core: `overlap.spare_core`)."""


@BESIDE
@pytest.mark.parametrize(("streamed", "settings", "against"), [
    (True, {}, "PoolTensors"),  # the sources loaded for the logit check (stored in the written dtype)
    (True, {"dtype": "float32", "out_dtype": "bfloat16"}, "FileTensors"),  # their files, read again
    (False, {}, "PoolTensors"),  # the in-memory export's own pool
], ids=["streamed, checked against the loaded sources", "streamed, checked against the files", "in memory"])
def test_default_verification_refuses_a_corrupted_tensor(streamed, settings, against, beside, tiny_pool,
                                                         tiny_source_dirs, tmp_path, monkeypatch):
    """A float32 merge written in bfloat16 is checked against its files: a loaded bfloat16 source does not hold
    the float32 values that the writing cast."""
    bad = "model.layers.4.mlp.down_proj.weight"
    monkeypatch.setattr(export, "_save_shard", _corrupting_writer(export._save_shard, bad))
    monkeypatch.setattr(export, "spare_core", lambda: beside)
    checked_against = []
    real_check = export.check_tensors

    def check(folder, entries, feed, **kwargs):
        checked_against.append(type(feed.tensors).__name__)
        return real_check(folder, entries, feed, **kwargs)

    monkeypatch.setattr(export, "check_tensors", check)
    g = genome(tiny_source_dirs, **settings)
    with pytest.raises(ExportError) as err:
        export_genome(g, tmp_path / "out") if streamed else export_checkpoint(tiny_pool, g, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "verify failed" in msg and bad in msg and "source 1 layer 2" in msg, msg
    assert checked_against == [against]
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("dfs-merge")]  # none left running
    export_genome(g, tmp_path / "unchecked", verify="off")  # what --verify off would have published
    assert (tmp_path / "unchecked" / "config.json").is_file()


def test_a_check_against_loaded_sources_that_plan_other_tensors_reads_the_files(tiny_source_dirs, tmp_path,
                                                                              monkeypatch):
    """Where the sources as transformers loaded them would plan other tensors than their files (a loader that
    renames or adds some), the tensor check reads the files instead, and the export goes through."""
    from dfs_merge.models.sources import SourcePool

    real_plan, real_check, against = export.plan_tensors, export.check_tensors, []

    def plan(tensors, route, dtype=None):
        entries = real_plan(tensors, route, dtype)
        return entries[:-1] if isinstance(tensors, SourcePool) else entries

    def check(folder, entries, feed, **kwargs):
        against.append(type(feed.tensors).__name__)
        return real_check(folder, entries, feed, **kwargs)

    monkeypatch.setattr(export, "plan_tensors", plan)
    monkeypatch.setattr(export, "check_tensors", check)
    out = export_genome(genome(tiny_source_dirs), tmp_path / "out")
    assert against == ["FileTensors"] and "read back equal bit for bit" in (out / "README.md").read_text()


@BESIDE
def test_default_verification_refuses_a_wrong_fold(beside, tiny_source_dirs, tmp_path, monkeypatch):
    """A fold that is wrong in the plan itself passes the tensor check; the logit check refuses it."""
    monkeypatch.setattr(export, "running_products", lambda route: [2.0] * len(route))
    monkeypatch.setattr(export, "spare_core", lambda: beside)
    with pytest.raises(ExportError) as err:
        export_genome(genome(tiny_source_dirs), tmp_path / "out")
    assert "logits differ" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@BESIDE
def test_cli_refuses_a_corrupted_tensor_and_wrong_logits_in_one_line(beside, tiny_source_dirs, tmp_path,
                                                                      monkeypatch):
    """`dfs-merge export` with its default verification: exit code 2, one line, no traceback, nothing published,
    whether a written tensor is corrupted or the checkpoint's logits are not the stitched model's."""
    monkeypatch.setattr(export, "spare_core", lambda: beside)
    save_genome(genome(tiny_source_dirs), tmp_path / "g.yaml")
    exports = tmp_path / "exports"
    bad = "model.layers.7.self_attn.q_proj.weight"
    with monkeypatch.context() as m:
        m.setattr(export, "_save_shard", _corrupting_writer(export._save_shard, bad))
        corrupted = run_cli("export", tmp_path / "g.yaml", "--out", exports / "corrupted")
    assert_refused(corrupted, "verify failed", bad, "differs from its source tensor", "nothing was written")
    assert len(message_lines(corrupted.err)) == 1, corrupted.err
    with monkeypatch.context() as m:
        m.setattr(export, "running_products", lambda route: [2.0] * len(route))
        folded = run_cli("export", tmp_path / "g.yaml", "--out", exports / "folded")
    assert_refused(folded, "verify failed", "logits differ", "nothing was written")
    assert len(message_lines(folded.err)) == 1, folded.err
    assert list(exports.iterdir()) == []
    assert run_cli("export", tmp_path / "g.yaml", "--out", exports / "good").code == 0
    assert [p.name for p in exports.iterdir()] == ["good"]


@BESIDE
def test_a_failed_reference_is_the_export_s_error(beside, tiny_source_dirs, tmp_path, monkeypatch):
    """The sources failing to load for the comparison (in the background or not) is the export's error, raised
    as itself, with nothing published and no thread left running."""

    def fail(*args, **kwargs):
        raise SourceError("the sources moved away")

    monkeypatch.setattr(export.SourcePool, "load", fail)
    monkeypatch.setattr(export, "spare_core", lambda: beside)
    with pytest.raises(SourceError, match="the sources moved away"):
        export_genome(genome(tiny_source_dirs), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("dfs-merge")]


def test_the_same_files_either_way(tiny_source_dirs, tmp_path, monkeypatch):
    """The verification beside the writing or after it: the very same published files."""
    g = genome(tiny_source_dirs, out_dtype="bfloat16")
    folders = []
    for beside in (False, True):
        monkeypatch.setattr(export, "spare_core", lambda beside=beside: beside)
        folders.append(export_genome(g, tmp_path / f"beside-{beside}", max_shard_size="200KB"))
    a, b = folders
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(list(a.glob("*.safetensors"))) > 1
    for name in names:
        if name != "README.md":  # the card names its folder
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_verify_flags(tiny_source_dirs, tmp_path):
    save_genome(genome(tiny_source_dirs), tmp_path / "g.yaml")
    off = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "off", "--verify", "off")
    assert off.code == 0 and "verif" not in off.err and "checking" not in off.err, off.err
    assert "not verified" in (tmp_path / "off" / "README.md").read_text()
    both = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "x", "--no-verify", "--verify", "full")
    assert_refused(both, "--no-verify", "--verify full")
    gguf = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "m.gguf", "--format", "gguf",
                   "--no-copy-tokenizer")
    assert_refused(gguf, "--no-copy-tokenizer", "--format hf")


def _source_copy(src: Path, dest: Path, readme: str | None = None, license_file: str | None = None,
                 name_or_path: str | None = None) -> Path:
    shutil.copytree(src, dest)
    if readme is not None:
        (dest / "README.md").write_text(readme)
    if license_file is not None:
        (dest / "LICENSE").write_text(license_file)
    if name_or_path is not None:
        cfg = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**cfg, "_name_or_path": name_or_path}))
    return dest


def test_card_lists_base_models_and_licences(tiny_source_dirs, tmp_path):
    a = _source_copy(tiny_source_dirs[0], tmp_path / "src-a", readme="---\nlicense: apache-2.0\n---\n# a\n",
                     name_or_path="org/tiny-a")
    b = _source_copy(tiny_source_dirs[1], tmp_path / "src-b",
                     license_file="MIT License\n\nCopyright (c) 2026\n\nPermission is hereby granted, free of charge")
    out = export_genome(genome([a, b]), tmp_path / "mixed", verify="off")
    card = (out / "README.md").read_text()
    front = front_matter(card)
    assert front["base_model"] == ["org/tiny-a", "src-b"]
    assert front["tags"] == ["merge", "dfs-merge"] and front["library_name"] == "transformers"
    assert front["license"] == "other"
    assert "| 0 | org/tiny-a | apache-2.0 |" in card and "| 1 | src-b | mit |" in card
    assert "format: dfs-merge/genome@1" in card and ROUTE in card  # the genome inline

    c = _source_copy(tiny_source_dirs[1], tmp_path / "src-c", readme="---\nlicense: Apache-2.0\n---\n")
    same = front_matter((export_genome(genome([a, c]), tmp_path / "same", verify="off") / "README.md").read_text())
    assert same["license"] == "apache-2.0" and same["base_model"] == ["org/tiny-a", "src-c"]
    self_merge = export_genome(genome([a, a]), tmp_path / "self", verify="off")
    assert front_matter((self_merge / "README.md").read_text())["base_model"] == ["org/tiny-a"]
