"""Tokenisation rules: exact boundaries, BOS/EOS once, truncation policy, chat templates."""

from __future__ import annotations

import random

import pytest

from dpo_lightning.data.chat import tokenize_chat_batch
from dpo_lightning.data.tokenize import (
    Limits,
    TokenizedExample,
    drop_signal_free_pairs,
    tokenize_text_batch,
    truncate,
)
from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer, train_bpe_tokenizer

B = 1  # a stand-in BOS id for the pure truncation tests


def text_example(tokenizer, prompt, completions, **limits):
    batch = {"row_id": [0], "prompt": [prompt], "completions": [completions], "pairs": [[[0, 1]]]}
    out = tokenize_text_batch(batch, tokenizer, Limits(**({"max_length": 256} | limits)))
    return {k: v[0] for k, v in out.items()}


def chat_example(tokenizer, prompt, completions, max_length=256):
    batch = {"row_id": [0], "prompt": [prompt], "completions": [completions], "pairs": [[[0, 1]]]}
    out = tokenize_chat_batch(batch, tokenizer, Limits(max_length))
    return {k: v[0] for k, v in out.items()}


def test_prompt_and_completion_are_tokenised_separately():
    # " recommended" is one token of this vocabulary; cut after " recommend" it must not merge.
    tokenizer = offline_sentiment_tokenizer(vocab_size=400, n=400)
    prompt, completions = "Highly recommend", ["ed by me.", "ed."]
    joint = tokenizer(prompt + completions[0], add_special_tokens=True)["input_ids"]
    ex = text_example(tokenizer, prompt, completions)
    eos = tokenizer.eos_token_id
    assert ex["prompt_ids"] == tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert ex["completion_ids"][0] == tokenizer(completions[0], add_special_tokens=False)["input_ids"] + [eos]
    assert ex["prompt_ids"] + ex["completion_ids"][0][:-1] != joint  # joint tokenisation merges
    assert tokenizer.decode(ex["prompt_ids"] + ex["completion_ids"][0]) == (
        f"{tokenizer.bos_token}{prompt}{completions[0]}{tokenizer.eos_token}"
    )


def test_one_bos_and_one_eos_even_when_the_text_has_them(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ex = text_example(tokenizer, "<s>Review of Open Water:", [" Great.</s>", " Bad."])
    assert ex["prompt_ids"][0] == bos and ex["prompt_ids"].count(bos) == 1
    for ids in ex["completion_ids"]:
        assert ids[-1] == eos and ids.count(eos) == 1 and bos not in ids


def test_truncation_keep_end_and_keep_start_hand_worked():
    prompt, completions = [B, 1, 2, 3, 4, 5], [[10, 11, 12], [20]]
    # max_prompt_length 4 -> [B,3,4,5] (keep_end keeps the BOS); 4 + 3 > 6 -> prompt cut to
    # max(6 - 3, min(4, 6 // 2)) = 3 tokens -> [B,4,5]; completions then fit in the 3 left.
    ex = truncate(prompt, completions, 6, 4, "keep_end", has_bos=True)
    assert ex.prompt_ids == [B, 4, 5] and ex.completion_ids == completions
    assert ex.truncated_prompt and not ex.truncated_completion
    ex = truncate(prompt, completions, 6, 4, "keep_start", has_bos=True)
    assert ex.prompt_ids == [B, 1, 2]


def test_completions_cut_from_the_end_never_to_zero():
    rng = random.Random(0)
    for _ in range(300):
        max_length = rng.randint(2, 40)
        prompt = list(range(100, 100 + rng.randint(1, max_length - 1)))
        completions = [list(range(rng.randint(1, 60))) for _ in range(rng.randint(2, 4))]
        ex = truncate(prompt, completions, max_length, None, rng.choice(["keep_start", "keep_end"]))
        assert ex.drop_reason is None
        for orig, cut in zip(completions, ex.completion_ids, strict=True):
            assert len(cut) >= 1 and cut == orig[: len(cut)]  # a non-empty prefix
            assert len(ex.prompt_ids) + len(cut) <= max_length


def test_prompt_that_fills_max_length_is_a_fault_unless_max_prompt_length_cuts_it():
    prompt, completions = list(range(8)), [[1], [2]]
    assert truncate(prompt, completions, 8).drop_reason == "prompt_fills_max_length"
    assert truncate(prompt, completions, 8, max_prompt_length=5).drop_reason is None


def test_chat_prompt_is_the_generation_prompt_and_eos_comes_from_the_template(tokenizer):
    prompt = [{"role": "user", "content": "Review of Open Water?"}]
    completions = [
        [{"role": "assistant", "content": "Great."}],
        [{"role": "assistant", "content": "Bad."}],
    ]
    ex = chat_example(tokenizer, prompt, completions)
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ex["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for comp, ids in zip(completions, ex["completion_ids"], strict=True):
        full = tokenizer.apply_chat_template(prompt + comp, tokenize=False)
        assert ex["prompt_ids"] + ids == tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.eos_token_id) == 1  # the template's end of turn, none added
    assert ex["notes"] == [] and ex["drop_reason"] is None


MERGING_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}[assistant]>{% endif %}"
)


def test_chat_tokens_merged_across_the_boundary_keep_the_inference_prompt():
    # Trained so "]>!!" is one token: the whole conversation tokenises differently at the boundary.
    tok = train_bpe_tokenizer(["[user]>hi</s>[assistant]>!!wow"] * 50 + ["a b c"], vocab_size=300)
    tok.chat_template = MERGING_TEMPLATE
    prompt = [{"role": "user", "content": "hi"}]
    completions = [
        [{"role": "assistant", "content": "!!wow"}],
        [{"role": "assistant", "content": "!!no"}],
    ]
    full = tok(tok.apply_chat_template(prompt + completions[0], tokenize=False), add_special_tokens=False)
    ex = chat_example(tok, prompt, completions)
    assert full["input_ids"][: len(ex["prompt_ids"])] != ex["prompt_ids"]  # the template breaks the prefix
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ex["prompt_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ex["completion_ids"][0] == tok("!!wow</s>", add_special_tokens=False)["input_ids"]
    assert ex["notes"] == ["chat_completion_retokenized"] * 2 and ex["drop_reason"] is None


def test_chat_template_that_renders_history_unlike_the_prompt_is_dropped(tokenizer):
    tok = train_bpe_tokenizer(["a b c"], vocab_size=300)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    prompt = [{"role": "user", "content": "hi"}]
    completions = [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    assert chat_example(tok, prompt, completions)["drop_reason"] == "chat_template_not_prefix"


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_max_prompt_length_through_the_batch_function(tokenizer, mode):
    prompt = "Review of Midnight Harbor, The Glass Orchard and Paper Lanterns:"
    full = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ex = text_example(
        tokenizer,
        prompt,
        [" Good.", " Bad."],
        max_length=64,
        max_prompt_length=6,
        truncation_mode=mode,
    )
    expected = full[:6] if mode == "keep_start" else full[:1] + full[-5:]
    assert ex["prompt_ids"] == expected and ex["truncated_prompt"]


def test_pairs_identical_after_truncation_are_dropped_not_trained(tokenizer):
    # " great film, really good" / "... really bad" share their first tokens: cut to 4 tokens
    # they are the same ids, a pair with no preference (loss ln 2, zero gradient).
    a, b = " great film, really good", " great film, really bad"
    ex = text_example(tokenizer, "Review:", [a, b], max_length=14)
    assert ex["drop_reason"] == "identical_after_truncation" and ex["truncated_completion"]
    assert ex["completion_ids"][0] == ex["completion_ids"][1]
    ex = text_example(tokenizer, "Review:", [a, b], max_length=64)  # room for the difference
    assert ex["drop_reason"] is None and ex["pairs"] == [[0, 1]]


def test_truncated_pairs_equal_up_to_whitespace_are_dropped():
    # ids differ (a double space is its own token) but the cut texts are the same up to whitespace
    comps = {"a  b x": [5, 9, 9, 6, 7], "a b y": [5, 9, 6, 8]}
    decode = {(5, 9, 9, 6): "a  b", (5, 9, 6): "a b"}.__getitem__
    ex = TokenizedExample([B], [comps["a  b x"][:4], comps["a b y"][:3]], truncated_completion=True)
    assert drop_signal_free_pairs(ex, [[0, 1]], lambda ids: decode(tuple(ids))) == [[0, 1]]
    assert ex.drop_reason == "identical_after_truncation"


def test_kwise_rows_lose_only_the_pairs_without_signal_and_their_unused_completions():
    # completions 0..3; pairs (0,1) (2,3); 2 and 3 became the same ids: pair (2,3) goes, and with
    # it completions 2 and 3 (no pair uses them); pair (0,1) is re-indexed unchanged.
    ex = TokenizedExample([B], [[4, 5], [4, 6], [7, 7], [7, 7]], truncated_completion=True)
    pairs = drop_signal_free_pairs(ex, [[0, 1], [2, 3]], str)
    assert pairs == [[0, 1]] and ex.completion_ids == [[4, 5], [4, 6]] and ex.drop_reason is None
    assert ex.notes == ["identical_after_truncation"]
    # three completions, all_pairs by score 3 > 2 > 1: (0,1) (0,2) (1,2); 1 == 2 after the cut
    ex = TokenizedExample([B], [[4, 5], [7, 8], [7, 8]], truncated_completion=True)
    pairs = drop_signal_free_pairs(ex, [[0, 1], [0, 2], [1, 2]], str)
    assert pairs == [[0, 1], [0, 2]] and len(ex.completion_ids) == 3


def test_texts_the_tokenizer_maps_to_the_same_ids_are_dropped():
    # A word-level tokenizer with an unknown token: two different emoji are both [UNK], so the
    # two completions are one id sequence although their texts differ.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "Review:": 3, "great": 4, "film": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    ex = text_example(tok, "Review:", [" great film \U0001f600", " great film \U0001f389"])
    assert ex["drop_reason"] == "identical_after_tokenization" and not ex["truncated_completion"]
    kept = text_example(tok, "Review:", [" great film", " film"])
    assert kept["drop_reason"] is None
