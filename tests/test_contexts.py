"""Teacher-context builders, caches, negative demonstrations, induced instructions, retrieval."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from unisd_components.cache import JsonCache, cached_array, dataset_fingerprint
from unisd_components.contexts import (
    _finish_negative,
    build_negatives,
    demonstration_context,
    fewshot_contexts,
    induce_instructions,
    induction_prompt,
    negative_demonstration_prompt,
    wrong_letter,
)
from unisd_components.embeddings import example_embeddings, nearest_neighbors
from unisd_components.generation import generate_texts


@dataclass
class Ex:
    id: str
    messages: tuple
    demonstration: str
    kind: str = "multiple_choice"
    choices: tuple = ("red", "green", "blue", "yellow")
    answer: str = "B"


def _examples(n: int) -> list[Ex]:
    return [
        Ex(
            id=f"toy/{i}",
            messages=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"QUESTION-{i}"},
            ),
            demonstration=f"GOLD-{i}. The answer is (B).",
        )
        for i in range(n)
    ]


def _user(context: list[dict]) -> str:
    return context[-1]["content"]


# ---- demonstration context


def test_demonstration_context_layout_and_no_mutation():
    ex = _examples(1)[0]
    original = json.dumps(ex.messages)
    ctx = demonstration_context(ex.messages, ex.demonstration)
    assert ctx[0] == {"role": "system", "content": "Be brief."}
    assert ctx[-1]["role"] == "user"
    text = _user(ctx)
    q, d = text.index("QUESTION-0"), text.index("GOLD-0")
    assert q < d < text.index("own approach")
    assert json.dumps(ex.messages) == original


def test_demonstration_context_needs_a_user_turn():
    with pytest.raises(ValueError):
        demonstration_context([{"role": "system", "content": "x"}], "demo")


# ---- few-shot contexts


def test_random_contexts_distinct_seeded_donors_never_self():
    examples = _examples(12)
    ctxs = fewshot_contexts(4, examples, k=3, strategy="random", seed=0)
    assert len(ctxs) == 3
    donors = []
    for ctx in ctxs:
        text = _user(ctx)
        assert "GOLD-4" not in text  # never the current gold
        assert text.rstrip().endswith("QUESTION-4")  # current plain prompt last
        assert "do not solve them again" in text
        assert ctx[0]["role"] == "system"
        found = [i for i in range(12) if f"GOLD-{i}." in text]
        assert len(found) == 1
        donors.append(found[0])
    assert len(set(donors)) == 3 and 4 not in donors
    assert fewshot_contexts(4, examples, k=3, strategy="random", seed=0) == ctxs
    other_seeds = {tuple(map(_user, fewshot_contexts(4, examples, 3, "random", seed=s))) for s in range(5)}
    assert len(other_seeds) > 1


def test_random_contexts_tiny_dataset_reuses_donors_but_never_self():
    examples = _examples(2)
    ctxs = fewshot_contexts(0, examples, k=3, strategy="random", seed=1)
    assert all("GOLD-1." in _user(c) and "GOLD-0" not in _user(c) for c in ctxs)
    with pytest.raises(ValueError):
        fewshot_contexts(0, examples[:1], k=2, strategy="random", seed=0)


def test_retrieval_contexts_kth_nearest_self_excluded():
    examples = _examples(5)
    # example 0 at angle 0; others at growing angles: nearest order 1, 2, 3, 4
    angles = [0.0, 0.1, 0.3, 0.6, 1.2]
    emb = np.array([[np.cos(a), np.sin(a)] for a in angles], dtype=np.float32)
    assert nearest_neighbors(emb, 0, 4) == [1, 2, 3, 4]
    ctxs = fewshot_contexts(0, examples, k=3, strategy="retrieval", seed=0, embeddings=emb)
    for j, ctx in enumerate(ctxs):
        assert f"GOLD-{j + 1}." in _user(ctx) and "GOLD-0" not in _user(ctx)
    # two shots each: context j gets ranks j and j + k
    two = fewshot_contexts(0, examples, k=2, strategy="retrieval", seed=0, embeddings=emb, n_shots=2)
    assert "GOLD-1." in _user(two[0]) and "GOLD-3." in _user(two[0])
    assert "GOLD-2." in _user(two[1]) and "GOLD-4." in _user(two[1])
    with pytest.raises(ValueError):
        fewshot_contexts(0, examples, k=3, strategy="retrieval", seed=0)


def test_induction_contexts_use_the_given_instructions():
    examples = _examples(3)
    ctxs = fewshot_contexts(
        1, examples, k=2, strategy="induction", seed=0, instructions=["INSTR-A", "INSTR-B"]
    )
    assert [_user(c).split("\n\n")[0] for c in ctxs] == ["INSTR-A", "INSTR-B"]
    assert all("QUESTION-1" in _user(c) and "GOLD" not in _user(c) for c in ctxs)
    with pytest.raises(ValueError):
        fewshot_contexts(1, examples, k=3, strategy="induction", seed=0, instructions=["only one"])


# ---- negatives and induction prompts


def test_wrong_letter_is_deterministic_and_wrong():
    picks = {wrong_letter(f"ex/{i}", "B", 4) for i in range(40)}
    assert picks == {"A", "C", "D"}
    assert wrong_letter("ex/7", "B", 4) == wrong_letter("ex/7", "B", 4)
    with pytest.raises(ValueError):
        wrong_letter("x", "A", 1)


def test_negative_prompt_multiple_choice_and_code():
    ex = _examples(1)[0]
    letter = wrong_letter(ex.id, ex.answer, 4)
    msgs = negative_demonstration_prompt(ex.messages, ex.choices, ex.answer, ex.kind, example_id=ex.id)
    text = _user(msgs)
    option = ex.choices["ABCD".index(letter)]
    assert f"({letter}) {option}" in text and f"The answer is ({letter})." in text
    code = negative_demonstration_prompt(
        [{"role": "user", "content": "Write add(a, b)."}], (), "def add(a, b):\n    return a + b", "code"
    )
    assert "return a + b" in _user(code) and "subtle bug" in _user(code)


def test_finish_negative_forces_the_wrong_final_answer_and_code_block():
    ex = _examples(1)[0]
    letter = wrong_letter(ex.id, ex.answer, 4)
    out = _finish_negative(ex, "Because reasons.\nThe answer is (B).")
    assert out == f"Because reasons.\n\nThe answer is ({letter})."
    text = (
        f"Step one.\nSo the answer must be (B)\nClearly the answer is ({letter}).\nThe answer is ({letter})."
    )
    assert (
        _finish_negative(ex, text)
        == f"Step one.\nClearly the answer is ({letter}).\n\nThe answer is ({letter})."
    )
    code_ex = Ex(id="c/1", messages=ex.messages, demonstration="", kind="code", answer="x")
    assert _finish_negative(code_ex, "Sure:\n```python\nx = 1\n```\nbye") == "```python\nx = 1\n```"


def test_induction_prompt_lists_the_solved_examples():
    text = _user(induction_prompt(_examples(2)))
    assert "QUESTION-0" in text and "GOLD-1" in text and "instruction" in text


# ---- caches


def test_json_cache_roundtrip_namespace_and_merge(tmp_path):
    a = JsonCache(tmp_path, "negatives", {"model": "m1", "version": "v1"})
    a.update({"x": "one"})
    assert JsonCache(tmp_path, "negatives", {"model": "m1", "version": "v1"}).get("x") == "one"
    assert JsonCache(tmp_path, "negatives", {"model": "m2", "version": "v1"}).get("x") is None
    assert JsonCache(tmp_path, "negatives", {"model": "m1", "version": "v2"}).get("x") is None
    b = JsonCache(tmp_path, "negatives", {"model": "m1", "version": "v1"})
    a.update({"y": "two"})
    b.update({"z": "three"})  # b never saw y: the write merges with disk
    fresh = JsonCache(tmp_path, "negatives", {"model": "m1", "version": "v1"})
    assert (fresh.get("x"), fresh.get("y"), fresh.get("z")) == ("one", "two", "three")


def test_cached_array_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6.0).reshape(2, 3)

    first, hit1 = cached_array(tmp_path, "embeddings", {"d": "x"}, compute)
    second, hit2 = cached_array(tmp_path, "embeddings", {"d": "x"}, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(first, second)


def test_dataset_fingerprint_sensitive_to_content_and_order():
    examples = _examples(3)
    assert dataset_fingerprint(examples) == dataset_fingerprint(_examples(3))
    assert dataset_fingerprint(examples) != dataset_fingerprint(examples[::-1])
    changed = _examples(3)
    changed[1].demonstration = "other"
    assert dataset_fingerprint(examples) != dataset_fingerprint(changed)


# ---- generation with a tiny random Llama


@pytest.fixture(scope="module")
def tiny_llama(bundled_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(bundled_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=bundled_tokenizer.bos_token_id,
        eos_token_id=bundled_tokenizer.eos_token_id,
        pad_token_id=bundled_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), bundled_tokenizer


def test_generate_texts_batched_seeded_and_side_effect_free(tiny_llama):
    model, tok = tiny_llama
    tok.padding_side = "right"
    model.train()
    prompts = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "A much longer question here?"}],
    ]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    out = generate_texts(model, tok, prompts, max_new_tokens=6, temperature=0.7, seed=3, batch_size=2)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert tok.padding_side == "right" and model.training
    assert generate_texts(model, tok, prompts, 6, 0.7, seed=3, batch_size=2) == out
    # left padding: a prompt's completion does not depend on its batch mates (greedy)
    alone = generate_texts(model, tok, prompts[:1], 6, temperature=0.0)
    together = generate_texts(model, tok, prompts, 6, temperature=0.0, batch_size=2)
    assert together[0] == alone[0]
    model.eval()


def test_generate_texts_batches_prompts_of_similar_length_and_keeps_the_callers_order(tiny_llama):
    model, tok = tiny_llama
    short, long = "Hi", "A much longer question with many more words in it than the other one?"
    prompts = [[{"role": "user", "content": text}] for text in (long, short, long, short)]
    widths, padded = [], []
    real_generate = model.generate

    def spy(*args, **kwargs):
        mask = kwargs["attention_mask"]
        widths.append(mask.shape[1])
        padded.append(int((mask == 0).sum()))
        return real_generate(*args, **kwargs)

    model.generate = spy
    try:
        together = generate_texts(model, tok, prompts, 5, temperature=0.0, batch_size=2)
    finally:
        del model.generate
    assert padded == [0, 0] and widths[0] < widths[1]  # the two short prompts, then the two long ones
    alone = [generate_texts(model, tok, [p], 5, temperature=0.0)[0] for p in prompts]
    assert together == alone  # each text back at its prompt's position


def test_build_negatives_generates_once_then_hits_cache(tiny_llama, tmp_path):
    model, tok = tiny_llama
    examples = _examples(3)
    code = Ex(
        id="c/0",
        messages=({"role": "user", "content": "Write f."},),
        demonstration="",
        kind="code",
        answer="def f(): pass",
    )
    negatives = build_negatives(model, tok, examples + [code], tmp_path, "tiny", max_new_tokens=8)
    assert set(negatives) == {"toy/0", "toy/1", "toy/2", "c/0"}
    for ex in examples:
        assert negatives[ex.id].endswith(f"The answer is ({wrong_letter(ex.id, 'B', 4)}).")
    assert negatives["c/0"].startswith("```python\n") and negatives["c/0"].endswith("```")
    # second call: no model at all, everything from the cache
    assert build_negatives(None, None, examples + [code], tmp_path, "tiny") == negatives
    # an edited example is regenerated (with no model, that fails loudly)
    edited = _examples(3)
    edited[0].demonstration = "changed"
    with pytest.raises(AttributeError):
        build_negatives(None, None, edited, tmp_path, "tiny")


def test_induce_instructions_once_then_cache(tiny_llama, tmp_path):
    model, tok = tiny_llama
    examples = _examples(5)
    instructions = induce_instructions(model, tok, examples, 3, tmp_path, "tiny", max_new_tokens=8)
    assert len(instructions) == 3 and all(isinstance(s, str) and "\n\n" not in s for s in instructions)
    assert induce_instructions(None, None, examples, 3, tmp_path, "tiny") == instructions
    ctxs = fewshot_contexts(0, examples, 3, "induction", seed=0, instructions=instructions)
    assert all(_user(c).startswith(instructions[j]) for j, c in enumerate(ctxs))


# ---- retrieval with the real bundled all-MiniLM-L6-v2


class _NoEncode:
    def encode(self, *args, **kwargs):
        raise AssertionError("the embedder was called: the cache missed")


def test_retrieval_with_real_embedder_is_sensible_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("UNISD_EMBEDDER", raising=False)
    texts = [
        "What is the boiling point of water at sea level?",
        "At what temperature does water boil under normal atmospheric pressure?",
        "Write a Python function that reverses a list.",
        "Implement a Python function returning the reverse of a given list.",
        "Which planet is known as the Red Planet?",
        "Name the planet that appears red in the night sky.",
    ]
    examples = [
        Ex(id=f"r/{i}", messages=({"role": "user", "content": t},), demonstration=f"D{i}")
        for i, t in enumerate(texts)
    ]
    emb = example_embeddings(examples, tmp_path)
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    for i in range(6):
        nearest = nearest_neighbors(emb, i, 5)
        assert i not in nearest and nearest[0] == i ^ 1  # the paraphrase pair
    ctx = fewshot_contexts(0, examples, 1, "retrieval", seed=0, embeddings=emb)[0]
    assert "boil under normal" in _user(ctx)
    again = example_embeddings(examples, tmp_path, embedder=_NoEncode())
    np.testing.assert_array_equal(again, emb)
    with pytest.raises(AssertionError, match="cache missed"):
        example_embeddings(examples[:5], tmp_path, embedder=_NoEncode())


def test_random_donors_vary_across_examples():
    """Seeded per example: one global shuffle would hand nearly every example the same donors."""
    examples = _examples(30)
    first_donors = set()
    for i in range(30):
        text = _user(fewshot_contexts(i, examples, 2, "random", seed=0)[0])
        first_donors.update(j for j in range(30) if f"GOLD-{j}." in text)
    assert len(first_donors) >= 10
