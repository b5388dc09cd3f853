"""The bundled lm-eval suites (eval_suites/): they load offline, their splits keep their promises,
and every task scores to finite numbers on a tiny random Llama."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dfs_merge import CHECKOUT

SUITES = CHECKOUT / "eval_suites"

# task -> (output type, least number of documents, fields every document has)
TASKS = {
    "prose_ppl_dev": ("loglikelihood_rolling", 20, {"id", "text"}),
    "prose_ppl_val": ("loglikelihood_rolling", 20, {"id", "text"}),
    "prose_ppl_test": ("loglikelihood_rolling", 40, {"id", "text"}),
    "cloze_mc_dev": ("multiple_choice", 160, {"id", "query", "choices", "gold", "answer"}),
    "cloze_mc_val": ("multiple_choice", 150, {"id", "query", "choices", "gold", "answer"}),
    "cloze_mc_test": ("multiple_choice", 200, {"id", "query", "choices", "gold", "answer"}),
    "arith_gen_dev": ("generate_until", 100, {"id", "question", "answer"}),
    "arith_gen_test": ("generate_until", 100, {"id", "question", "answer"}),
    "code_complete_dev": ("loglikelihood", 120, {"id", "module", "function", "line", "context", "target", "rest"}),
    "code_complete_val": ("loglikelihood", 120, {"id", "module", "function", "line", "context", "target", "rest"}),
    "code_complete_test": ("loglikelihood", 200, {"id", "module", "function", "line", "context", "target", "rest"}),
    "code_ppl_dev": ("loglikelihood_rolling", 40, {"id", "module", "function", "line", "text"}),
    "code_ppl_val": ("loglikelihood_rolling", 40, {"id", "module", "function", "line", "text"}),
    "code_ppl_test": ("loglikelihood_rolling", 80, {"id", "module", "function", "line", "text"}),
}
CODE_SUITES = ("code_complete", "code_ppl")  # val is a file of its own (other modules), not a slice of dev's
PAIRS = [("prose_ppl", "text"), ("cloze_mc", "query"), ("arith_gen", "question")]
METRICS = {
    "prose_ppl": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"],
    "cloze_mc": ["acc,none", "acc_norm,none"],
    "arith_gen": ["exact_match,strip"],
    "code_complete": ["acc,none", "perplexity,none"],
    "code_ppl": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"],
}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")}
    os.environ.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hfhome"))
    )
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def task_dict(offline, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    # a working directory far from eval_suites/: relative data_files must still be found
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        tm = TaskManager(include_path=str(SUITES), include_defaults=False)
        missing = set(TASKS) - set(tm.all_tasks)
        assert not missing, f"not indexed: {missing}"
        loaded = tm.load(list(TASKS))
        for task in loaded["tasks"].values():  # the dataset is read at load time; touch it here too
            list(task.test_docs())
    finally:
        os.chdir(cwd)
    return loaded


def _docs(task_dict, name):
    return list(task_dict["tasks"][name].test_docs())


def test_every_task_is_indexed_and_typed(task_dict):
    for name, (output_type, _, _) in TASKS.items():
        assert name in task_dict["tasks"]
        assert task_dict["tasks"][name].OUTPUT_TYPE == output_type, name


@pytest.mark.parametrize("name", list(TASKS))
def test_sizes_and_fields(task_dict, name):
    _, least, fields = TASKS[name]
    docs = _docs(task_dict, name)
    assert len(docs) >= least
    for d in docs:
        assert fields <= set(d), (name, d)
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    if name.startswith("prose_ppl"):
        words = [len(d["text"].split()) for d in docs]
        assert 100 <= min(words) and max(words) <= 350, (min(words), max(words))
    if name.startswith("cloze_mc"):
        for d in docs:
            assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
            assert d["choices"][d["gold"]] == d["answer"]
            assert all(len(c.split()) <= 3 for c in d["choices"])
        golds = [d["gold"] for d in docs]
        assert min(golds.count(g) for g in range(4)) > len(docs) / 8  # the answer's place varies
    if name.startswith("code_complete"):
        for d in docs:
            # the context ends inside the target's line, after its indentation and first word; the target is the
            # rest of that line up to its last letter or digit, `rest` what follows it on the line
            assert d["context"].startswith(("def ", "async def ")), d["id"]
            head = d["context"].rsplit("\n", 1)[1]
            assert re.fullmatch(r" +([A-Za-z_][A-Za-z0-9_]*)?[A-Za-z0-9]", head), (d["id"], head)
            assert re.fullmatch(r"[^A-Za-z0-9_\n][^\n]*[A-Za-z0-9]", d["target"]), d["id"]
            assert len(d["target"].strip()) >= 3 and re.fullmatch(r"[^A-Za-z0-9\n]*", d["rest"]), d["id"]
    if name.startswith("code_ppl"):
        for d in docs:
            assert d["text"].startswith(("def ", "async def ")) and d["text"].endswith("\n"), d["id"]
            assert 250 <= len(d["text"]) <= 900
    if name.startswith("arith_gen"):
        for d in docs:
            a, op, b = d["question"].split()
            want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert d["answer"] == str(want)


@pytest.mark.parametrize("suite", CODE_SUITES)
def test_code_splits_are_disjoint_by_module(task_dict, suite):
    """dev, val and test of a code suite come from different top-level packages of the standard library, so no
    function (nor any copy of its text) is in two splits."""
    docs = {split: _docs(task_dict, f"{suite}_{split}") for split in ("dev", "val", "test")}
    packages = {split: {d["module"].split(".")[0] for d in ds} for split, ds in docs.items()}
    functions = {split: {(d["module"], d["function"]) for d in ds} for split, ds in docs.items()}
    field = "context" if suite == "code_complete" else "text"
    texts = {split: {" ".join(d[field].split()) for d in ds} for split, ds in docs.items()}
    for a, b in (("dev", "val"), ("dev", "test"), ("val", "test")):
        assert not packages[a] & packages[b], (a, b, packages[a] & packages[b])
        assert not functions[a] & functions[b] and not texts[a] & texts[b]
    for split, ds in docs.items():
        assert len(functions[split]) == len(ds)  # one document per function
        assert len(packages[split]) >= 30  # spread over many packages, not one large one
        first = {d["module"].split(".")[0] for d in ds[:20]}
        assert len(first) >= 15  # ... from the first rows on, so that any limit spans them


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the code suites were made from Python 3.11.7's library")
def test_the_code_suites_are_what_the_script_writes(tmp_path):
    """`make_code_data.py` on the library they were made from writes the committed files byte for byte."""
    subprocess.run([sys.executable, str(SUITES / "make_code_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written == sorted(f"{t}.jsonl" for t in TASKS if t.startswith(CODE_SUITES))
    for name in written:
        assert (tmp_path / name).read_bytes() == (SUITES / "data" / name).read_bytes(), name


def test_the_code_script_refuses_another_python_without_a_library(tmp_path):
    """On another Python than the suites' own, the script says how to get the same data instead of writing other
    data silently."""
    code = ("import runpy, sys; sys.version_info = (3, 99, 0, 'final', 0); sys.argv = ['make_code_data.py', '--out', "
            f"{str(tmp_path)!r}]; runpy.run_path({str(SUITES / 'make_code_data.py')!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "3.11.7" in res.stderr and "--stdlib" in res.stderr, res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model", [pytest.param("qwen2.5-coder-0.5b-instruct", marks=[pytest.mark.slow, pytest.mark.qwen]),
                                   "smollm2-135m-instruct"])
def test_code_targets_start_where_the_tokenizers_split(model):
    """lm-eval scores a target as the tokens of context + target after the context's own tokens: each item's
    context must tokenize as the start of the whole, and the whole as the start of its line with what follows it,
    else the model would read, or be asked for, other tokens than a file's."""
    from transformers import AutoTokenizer

    from dfs_merge.models.store import is_complete, models_dir

    folder = models_dir() / model
    if not is_complete(folder):
        pytest.skip(f"{model} is not converted here (make models)")
    tok = AutoTokenizer.from_pretrained(folder)
    for split in ("dev", "val", "test"):
        for line in (SUITES / "data" / f"code_complete_{split}.jsonl").open():
            d = json.loads(line)
            context = tok(d["context"])["input_ids"]
            whole = tok(d["context"] + d["target"])["input_ids"]
            assert whole[: len(context)] == context, d["id"]
            for after in ("\n", "\n    pass\n", "\n\n\ndef f():\n"):
                line = tok(d["context"] + d["target"] + d["rest"] + after)["input_ids"]
                assert line[: len(whole)] == whole, (d["id"], after)


@pytest.mark.parametrize("prefix,field", PAIRS)
def test_dev_and_test_are_disjoint(task_dict, prefix, field):
    dev = {d[field] for d in _docs(task_dict, f"{prefix}_dev")}
    test = {d[field] for d in _docs(task_dict, f"{prefix}_test")}
    assert not dev & test
    if f"{prefix}_val" in TASKS:  # the validation split: the rest of the dev file, in neither
        val = [d[field] for d in _docs(task_dict, f"{prefix}_val")]
        assert not set(val) & (dev | test)
        whole = [json.loads(line)[field] for line in (SUITES / "data" / f"{prefix}_dev.jsonl").open()]
        assert sorted(dev | set(val)) == sorted(whole)
    if prefix == "prose_ppl":  # different chapters of the book
        assert {d["chapter"] for d in _docs(task_dict, "prose_ppl_dev")}.isdisjoint(
            d["chapter"] for d in _docs(task_dict, "prose_ppl_test")
        )
        assert not any(t[:200] in d for t in test for d in dev)


def test_data_files_stay_relative_to_the_suite_folder():
    """The YAMLs name paths relative to eval_suites/ and load them through local_data.load."""
    import yaml

    for name in TASKS:
        text = (SUITES / f"{name}.yaml").read_text()
        cfg = yaml.safe_load(text)
        path = cfg["dataset_kwargs"]["data_files"]["test"]
        assert not Path(path).is_absolute()
        assert (SUITES / path).is_file()


def test_loader_accepts_absolute_paths():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_suite_local_data", SUITES / "local_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ds = mod.load(data_files={"test": str(SUITES / "data" / "arith_gen_dev.jsonl")}, version=1.0)
    assert len(ds["test"]) >= 100
    part = mod.load(data_files={"test": str(SUITES / "data" / "arith_gen_dev.jsonl")}, rows=[10, 15])
    assert part["test"]["id"] == ds["test"]["id"][10:15]


def _tiny_lm():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = [json.loads(line)["text"] for line in (SUITES / "data" / "prose_ppl_dev.jsonl").open()][:5]
    tok.train_from_iterator(sample + ["0123456789 + - * ="], trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), hf_tok


def test_every_task_scores_finite_on_a_tiny_model(task_dict, one_thread):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    model, tok = _tiny_lm()
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", max_length=1024, batch_size=8)
    out = evaluate(lm=lm, task_dict=task_dict, limit=3, bootstrap_iters=0, log_samples=False)
    for name in TASKS:
        res = out["results"][name]
        for metric in METRICS[name.rsplit("_", 1)[0]]:
            value = res[metric]
            assert math.isfinite(float(value)), (name, metric, value)
        assert res["sample_len"] == 3
