"""Tokenization of one example: BOS once, EOS once, truncation that never empties a completion."""

from types import SimpleNamespace

from dpo_lightning.data.tokenize import Limits, tokenize_text_batch, truncate


def tokenize_one(tokenizer, prompt: str, completions: list[str], max_length: int):
    """One row through the DataModule's tokenisation function."""
    batch = {"prompt": [prompt], "completions": [completions], "pairs": [[]], "row_id": [0]}
    out = tokenize_text_batch(batch, tokenizer, Limits(max_length))
    return SimpleNamespace(prompt_ids=out["prompt_ids"][0], completion_ids=out["completion_ids"][0])


def test_prompt_bos_once_completion_eos_once(tokenizer):
    ex = tokenize_one(tokenizer, "Review of Open Water:", [" The story was great.", " Bad."], 64)
    assert ex.prompt_ids[0] == tokenizer.bos_token_id
    assert ex.prompt_ids.count(tokenizer.bos_token_id) == 1
    for comp in ex.completion_ids:
        assert comp[-1] == tokenizer.eos_token_id and comp.count(tokenizer.eos_token_id) == 1
        assert tokenizer.bos_token_id not in comp
    # a prompt that already starts with the BOS text is not given a second one
    again = tokenize_one(tokenizer, tokenizer.bos_token + "Review of Open Water:", [" ok"], 64)
    assert again.prompt_ids == ex.prompt_ids


def test_prompt_cut_first_then_completions_never_empty():
    prompt, comps = list(range(100, 140)), [list(range(10)), list(range(5))]
    ex = truncate(
        prompt, comps, max_length=30, max_prompt_length=25, truncation_mode="keep_end", has_bos=True
    )
    # prompt cut to 25, then to max_length - longest completion = 20, keeping BOS and the end
    assert len(ex.prompt_ids) == 20 and ex.prompt_ids[0] == 100 and ex.prompt_ids[-1] == 139
    assert ex.completion_ids == comps and ex.truncated_prompt and not ex.truncated_completion
    # a very long completion: the prompt keeps max_length // 2, the completion is cut from the end
    ex2 = truncate(
        prompt, [list(range(60)), [1]], max_length=30, max_prompt_length=25, truncation_mode="keep_start"
    )
    assert ex2.prompt_ids == prompt[:15]
    assert ex2.completion_ids[0] == list(range(15)) and ex2.truncated_completion
    assert all(len(c) > 0 for c in ex2.completion_ids)


def test_prompt_that_fills_max_length_is_dropped_not_emptied():
    # a prompt that alone fills max_length is a fault (dropped and counted), not cut silently
    ex = truncate(list(range(50)), [[1, 2]], max_length=10, max_prompt_length=None)
    assert ex.drop_reason == "prompt_fills_max_length"
    # with max_prompt_length below max_length it is cut (end kept) and the example survives
    ex = truncate(list(range(50)), [[1, 2]], max_length=10, max_prompt_length=6)
    assert ex.drop_reason is None and ex.prompt_ids == list(range(44, 50))
    # cut to max_prompt_length == max_length, it still leaves no room: dropped, never emptied
    ex = truncate(list(range(50)), [[1, 2]], max_length=4, max_prompt_length=4)
    assert ex.drop_reason == "prompt_fills_max_length" and ex.completion_ids == [[1, 2]]
