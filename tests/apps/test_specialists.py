"""The SmolLM2 specialists' recipes: never trained on the target or a held-out item; the loss only where the
labels are; the bundled family suites are what the script writes."""

from __future__ import annotations

import itertools
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dfs_merge import CHECKOUT
from dfs_merge.apps import specialists as sp
from dfs_merge.apps.zoo import world

DRAWN = 3000  # documents drawn from each training stream (each specialist trains on at most 8 x 1200)


def test_no_specialist_is_trained_on_a_j_problem_or_a_held_out_item():
    held, val = sp.splits()
    targets = {p.question("j") for p in (*held.j_arith_dev, *held.j_arith_test, *val)}
    held_e = {p.text("e") for p in (*held.e_arith_dev, *held.e_arith_test)}
    renderings = {p.text("e") for p in (*held.j_arith_dev, *held.j_arith_test, *val)}  # the E twin of each target
    for name in sp.RECIPES:
        texts = list(itertools.islice(sp.training_texts(name, held, val), DRAWN))
        assert not any("？ kotae :" in t for t in texts), f"{name} saw a J word problem (a J question and its cue)"
        assert not any(q in t for t in texts for q in list(targets)[:50])
        assert not set(texts) & (held_e | renderings | held.held_out_texts()), f"{name} saw a held-out item"
    assert "e_arith" not in sp.RECIPES["j"]["mix"] and set(sp.RECIPES["m"]["mix"]) == {"e_arith"}
    j_only = set(world.j_words())
    for name in sp.RECIPES:  # the texts a block is kept at the base's on: English stories, never held out
        kept = list(itertools.islice(sp.preserved_texts(name, held), DRAWN))
        assert kept and not any(set(t.split()) & j_only for t in kept), f"{name} kept its block on J text"
        assert not set(kept) & (held_e | renderings | held.held_out_texts())


def test_the_preservation_term_is_zero_at_the_base_and_grows_with_the_adapter(tiny_tokenizer):
    from builders import tiny_llama_config
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))),
                           LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 2]))
    texts = ["The cat sat on the mat.", "Alice was beginning to get very tired."]
    assert float(sp.preserve_loss(model, tiny_tokenizer, texts, [0, 2], 32)) == 0.0  # LoRA's B starts at zero
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    after_0, after_2 = (float(sp.preserve_loss(model, tiny_tokenizer, texts, [k], 32)) for k in (0, 2))
    assert after_0 == 0.0 < after_2  # layer 0 has no adapter; layers 1-2 do
    both = float(sp.preserve_loss(model, tiny_tokenizer, texts, [0, 2], 32))
    assert abs(both - after_2) < 1e-6 * after_2  # the terms add, from one forward


def test_each_specialist_trains_only_its_block_of_layers():
    assert set(sp.RECIPES["j"]["layers"]) == set(sp.BOTTOM) | set(sp.TOP)
    assert set(sp.RECIPES["m"]["layers"]) == set(sp.MIDDLE)
    assert not set(sp.BOTTOM + sp.TOP) & set(sp.MIDDLE) and len(sp.BOTTOM + sp.MIDDLE + sp.TOP) == sp.LAYERS


def test_validation_split_is_disjoint_from_dev_and_test():
    held, val = sp.splits()
    assert len(val) == sp.VAL_SIZE and len(set(val)) == len(val)
    assert not set(val) & held.held_out_problems()


def test_loss_is_taken_only_at_the_answer_and_equals_the_full_head_loss(tiny_tokenizer):
    tok = tiny_tokenizer
    texts = ["tom has 3 apples . tom finds 4 apples . how many apples does tom have now ? answer : 7",
             "ann has 2 pens . ann loses 1 pens . how many pens does ann have now ? answer : 1"]
    ids, attention, labels = sp.batch_of(texts, tok, answer_only=True, max_tokens=64)
    for row, text in zip(range(2), texts, strict=True):
        answer = tok(" " + text.rsplit(" ", 1)[1])["input_ids"] + [tok.eos_token_id]
        assert int(labels[row].sum()) == len(answer)
        assert ids[row][labels[row]].tolist() == answer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    ours = sp.loss_where_labelled(model, ids, attention, labels)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits[labels[:, 1:]], ids[:, 1:][labels[:, 1:]])
    assert torch.allclose(ours, want, atol=1e-6)


def test_the_bundled_family_suites_are_what_the_script_writes(tmp_path):
    (tmp_path / "data").mkdir()
    for path in sp.write_suites(tmp_path):
        committed = CHECKOUT / "eval_suites" / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), f"{committed}: run `python -m dfs_merge.apps.specialists suites`"


def test_the_target_is_the_zoo_j_problems_scored_with_digit_answers():
    held, _ = sp.splits()
    assert sp.FAMILY_TASKS["family_arith_j_test"] == "zoo_arith_j_test" and len(held.j_arith_dev) >= 500
    assert all(world.num(p.answer, "e").isdigit() for p in held.j_arith_test)


def test_the_digit_target_is_the_same_j_problems_with_digit_operands():
    held, val = sp.splits()
    for task, split in sp.DIGIT_TASKS.items():
        rows = [json.loads(line) for line in (CHECKOUT / "eval_suites" / "data" / f"{task}.jsonl").open()]
        words = {"j_arith_dev": held.j_arith_dev, "j_arith_val": val, "j_arith_test": held.j_arith_test}[split]
        assert len(rows) == len(words)
        for row, p in zip(rows, words, strict=True):
            # the J rendering with each operand's number word replaced by its digits, nothing else changed
            word = p.question("j").split()
            digit = row["question"].split()
            assert len(word) == len(digit)
            changed = [(w, d) for w, d in zip(word, digit, strict=True) if w != d]
            assert changed == [(world.num(n, "j"), str(n)) for n in (p.a, p.b) if world.num(n, "j") != str(n)]
            assert (row["answer"], row["op"], row["a"], row["b"]) == (str(p.answer), p.op, p.a, p.b)
