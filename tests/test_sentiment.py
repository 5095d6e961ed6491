"""The sentiment experiment's stages on tiny data: corpus, sampling, rewards, labels, frontier."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lightning.sentiment.corpus import review_prefixes, review_texts
from dpo_lightning.sentiment.evaluate import (
    best_of_n_kl,
    best_of_n_reward,
    sample_and_score,
    sequence_kl,
)
from dpo_lightning.sentiment.frontier import plot_frontier, read_frontier_csv, write_frontier_csv
from dpo_lightning.sentiment.label import AllPairs, BestVsWorst, preference_dataset, preference_rows
from dpo_lightning.sentiment.rewards import ClassifierReward, VaderReward
from dpo_lightning.sentiment.sampling import (
    completion_logps,
    cut_at_eos,
    encode_prompts,
    left_pad,
    sample_completions,
)
from tests.conftest import make_tiny_model


# -- corpus ------------------------------------------------------------------------------------
def test_reviews_are_deterministic_and_mixed():
    texts = review_texts(200, seed=1)
    assert texts == review_texts(200, seed=1) and texts != review_texts(200, seed=2)
    scores = VaderReward()(texts)
    assert (scores > 0.3).float().mean() > 0.2 and (scores < -0.3).float().mean() > 0.2


def test_prefixes_are_2_to_8_token_prefixes(tokenizer):
    texts = review_texts(50)
    prompts = review_prefixes(texts, tokenizer, 2, 8, seed=0)
    lengths = set()
    for text, prompt in zip(texts, prompts, strict=True):
        assert text.startswith(prompt)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert 2 <= n <= 8
        lengths.add(n)
    assert len(lengths) > 3  # lengths vary


# -- sampling ----------------------------------------------------------------------------------
def test_cut_at_eos_and_left_pad():
    assert cut_at_eos([5, 6, 2, 0, 0], 2) == [5, 6, 2]
    assert cut_at_eos([5, 6], 2) == [5, 6]
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sample_completions_shapes_and_seed(tokenizer):
    model = make_tiny_model(len(tokenizer))
    prompt_ids = encode_prompts(tokenizer, ["Review of Iron Valley:", "The"])
    a = sample_completions(model, tokenizer, prompt_ids, k=3, max_new_tokens=6, batch_size=1, seed=3)
    b = sample_completions(model, tokenizer, prompt_ids, k=3, max_new_tokens=6, batch_size=2, seed=3)
    assert len(a) == 2 and all(len(row) == 3 for row in a)
    for row in a:
        for c in row:
            assert 1 <= len(c) <= 6
            assert tokenizer.eos_token_id not in c[:-1]  # nothing after an EOS
    assert a == sample_completions(model, tokenizer, prompt_ids, k=3, max_new_tokens=6, batch_size=1, seed=3)
    assert len(b) == 2


def test_sampling_is_untruncated(tokenizer):
    """Temperature-1 samples follow π itself: the share of first tokens outside π's top 50
    matches π's mass there (top-k sampling, a common default, would give 0)."""
    model = make_tiny_model(len(tokenizer), seed=1)
    prompt = encode_prompts(tokenizer, ["Review of"])
    with torch.no_grad():
        probs = model(input_ids=torch.tensor(prompt)).logits[0, -1].softmax(-1)
    top50 = set(probs.topk(50).indices.tolist())
    outside_mass = 1 - probs.topk(50).values.sum().item()
    assert outside_mass > 0.3  # a random tiny model spreads its mass
    first = [
        c[0] for c in sample_completions(model, tokenizer, prompt, k=2000, max_new_tokens=1, batch_size=1)[0]
    ]
    share = sum(t not in top50 for t in first) / len(first)
    assert share == pytest.approx(outside_mass, abs=0.04)


def test_completion_logps_match_naive_loop(tokenizer):
    model = make_tiny_model(len(tokenizer))
    prompts = [[1, 30, 31, 32], [1, 40]]
    comps = [[[50, 51, 2], [52]], [[53, 54, 55, 2], [56, 2]]]
    got = completion_logps(model, prompts, comps, tokenizer.pad_token_id, batch_size=1)
    for i, (p, row) in enumerate(zip(prompts, comps, strict=True)):
        for j, c in enumerate(row):
            full = torch.tensor([p + c])
            with torch.no_grad():
                logp = model(input_ids=full).logits[0].log_softmax(-1)
            expected = sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c))
            assert got[i, j].item() == pytest.approx(expected, abs=1e-4)


# -- rewards -----------------------------------------------------------------------------------
def test_vader_orders_sentiment():
    r = VaderReward()(["The acting was wonderful. I loved it.", "The film came out.", "Awful. I hated it."])
    assert r[0] > 0.5 and r[1] == 0.0 and r[2] < -0.5


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tokenizer):
    """A 2-label sequence classifier built from a config and saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clf")
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_classifier_reward_is_positive_probability(tiny_classifier, tokenizer):
    from transformers import AutoModelForSequenceClassification

    texts = ["The acting was wonderful.", "Awful.", "The story was dull and boring. Avoid it."]
    reward = ClassifierReward(str(tiny_classifier), positive_label="POSITIVE", batch_size=2, device="cpu")
    got = reward(texts)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():  # one text at a time: no padding at all
        expected = [model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for t in texts]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-5)
    neg = ClassifierReward(str(tiny_classifier), positive_label="NEGATIVE", device="cpu")(texts)
    torch.testing.assert_close(got + neg, torch.ones(3), rtol=1e-5, atol=1e-5)


def test_classifier_reward_unknown_label(tiny_classifier):
    with pytest.raises(ValueError, match=r"positive_label='pos'.*NEGATIVE"):
        ClassifierReward(str(tiny_classifier), positive_label="pos", device="cpu")


# -- labelling ---------------------------------------------------------------------------------
def test_pairings():
    scores = [0.1, 0.5, 0.5, -1.0]
    assert sorted(AllPairs()(scores)) == [
        (0, 3),
        (1, 0),
        (1, 3),
        (2, 0),
        (2, 3),
    ]  # the 1-2 tie: none
    assert BestVsWorst()(scores) == [(1, 3)]
    assert BestVsWorst()([0.2, 0.2]) == [] and AllPairs()([0.2, 0.2]) == []


def test_preference_rows_and_split(tokenizer):
    prompts = [f"p{i}" for i in range(20)]
    completions = [[" good", " bad", " bad", " "] for _ in prompts]
    scores = [[1.0, -1.0, -0.5, 0.0] for _ in prompts]
    rows = preference_rows(prompts, completions, scores, AllPairs())
    # Pairs: (0,1), (0,2) kept; (2,1) has equal texts, (0,3), (3,1), (3,2) have a blank one.
    assert len(rows) == 40
    assert rows[0] == {
        "prompt": "p0",
        "chosen": " good",
        "rejected": " bad",
        "chosen_score": 1.0,
        "rejected_score": -1.0,
        "prompt_id": 0,
    }
    dd = preference_dataset(rows, val_fraction=0.2, seed=0)
    train_ids, val_ids = set(dd["train"]["prompt_id"]), set(dd["validation"]["prompt_id"])
    assert len(val_ids) == 4 and not train_ids & val_ids and len(train_ids | val_ids) == 20
    with pytest.raises(ValueError, match="no preference pairs"):
        preference_dataset([])


def test_pairs_folder_loads_in_datamodule(tmp_path, tokenizer):
    from dpo_lightning.data.datamodule import PreferenceDataModule

    rows = preference_rows(["a", "b", "c"], [[" x", " y"]] * 3, [[1.0, 0.0]] * 3, AllPairs())
    preference_dataset(rows, 0.3).save_to_disk(str(tmp_path / "pairs"))
    dm = PreferenceDataModule(tokenizer, path=str(tmp_path / "pairs"), batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_pairs"] == 2


# -- evaluation --------------------------------------------------------------------------------
def test_best_of_n_numbers():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_reward(torch.tensor([[0.1, 0.9], [-1.0, -0.5]])) == pytest.approx(0.2)
    assert sequence_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -3.0])).item() == pytest.approx(0.75)


def test_kl_is_zero_for_the_reference_and_positive_after_a_change(tokenizer):
    ref = make_tiny_model(len(tokenizer))
    same = make_tiny_model(len(tokenizer))
    prompts = ["Review of", "My thoughts on"]
    ids = encode_prompts(tokenizer, prompts)
    args = dict(
        tokenizer=tokenizer,
        prompts=prompts,
        prompt_ids=ids,
        reward=VaderReward(),
        k=8,
        max_new_tokens=5,
    )
    assert sample_and_score(same, ref, **args).kl == 0.0
    with torch.no_grad():  # sharpen the policy: KL(π‖π_ref) > 0 by a clear margin
        same.lm_head.weight.mul_(4.0)
    res = sample_and_score(same, ref, **args)
    assert res.kl > 0.1
    assert res.rewards.shape == (2, 8) and len(res.completions[1]) == 8


# -- frontier ----------------------------------------------------------------------------------
def test_frontier_csv_roundtrip_and_png(tmp_path):
    rows = [
        {"label": "sft", "beta": None, "reward": 0.1, "kl": 0.0},
        {"label": "best_of_n", "beta": None, "reward": 0.5, "kl": 0.64},
        {"label": "dpo_beta_0.1", "beta": 0.1, "reward": 0.4, "kl": 2.0},
        {"label": "dpo_beta_0.5", "beta": 0.5, "reward": 0.3, "kl": 0.5},
    ]
    write_frontier_csv(rows, tmp_path / "f.csv")
    back = read_frontier_csv(tmp_path / "f.csv")
    assert [r["label"] for r in back] == [r["label"] for r in rows]
    assert back[0]["beta"] is None and back[3]["beta"] == 0.5 and back[2]["kl"] == 2.0
    plot_frontier(back, tmp_path / "f.png", "VADER compound")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- model loading -----------------------------------------------------------------------------
def test_gguf_file_reaches_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM

    from dpo_lightning.models.loading import load_causal_lm

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return make_tiny_model(64)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    load_causal_lm("some/folder", gguf_file="model-q8_0.gguf")
    assert seen["name"] == "some/folder" and seen["gguf_file"] == "model-q8_0.gguf"


def test_preference_rows_skip_pairs_equal_up_to_whitespace():
    # the data layer drops such pairs (differ_only_by_whitespace): labelling never writes them
    rows = preference_rows(["p"], [[" good", " bad", "bad  "]], [[1.0, -1.0, -0.5]], AllPairs())
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(" good", " bad"), (" good", "bad  ")]
