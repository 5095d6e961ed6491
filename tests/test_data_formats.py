"""Row formats: each shape of public preference data normalises to {prompt, completions, pairs}."""

from __future__ import annotations

import pytest

from dpo_lightning.data.auto import AutoFormat, resolve_format
from dpo_lightning.data.chat import ConversationalFormat
from dpo_lightning.data.formats import (
    ImplicitPromptFormat,
    InvalidRow,
    StandardFormat,
    shared_prefix_cut,
)
from dpo_lightning.data.ranked import RankedFormat


def reason(fmt, row) -> str:
    with pytest.raises(InvalidRow) as err:
        fmt(row)
    return str(err.value)


def test_standard_column_mapping_and_system_prompt():
    fmt = StandardFormat(columns={"prompt": "question", "chosen": "good"}, system_prompt="Be kind.")
    out = fmt({"question": "Q?", "good": " yes", "rejected": " no"})
    assert out == {"prompt": "Be kind.\n\nQ?", "completions": [" yes", " no"], "pairs": [[0, 1]]}
    # a per-row system column overrides the configured one
    fmt = StandardFormat(columns={"system": "sys"}, system_prompt="default")
    assert fmt({"prompt": "P", "chosen": "a", "rejected": "b", "sys": "S"})["prompt"] == "S\n\nP"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"chosen": "a", "rejected": "b"}, "missing_prompt"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "null_prompt"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong_type_chosen"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_chosen"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected"),
    ],
)
def test_standard_faults(row, expected):
    assert reason(StandardFormat(), row) == expected


def test_implicit_prompt_hh_split_at_last_assistant_marker():
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A film?\n\nAssistant:"
    row = {"chosen": history + " Yes, a good one.", "rejected": history + " Yes, a bad one."}
    out = ImplicitPromptFormat()(row)
    # The shared prefix runs on to " Yes, a " but the prompt stops after the last marker.
    assert out["prompt"] == history
    assert out["completions"] == [" Yes, a good one.", " Yes, a bad one."]


def test_longest_common_prefix_backs_off_to_a_word_boundary():
    a, b = "The film was great", "The film was grim"
    cut = shared_prefix_cut(a, b, marker=None)
    assert a[:cut] == "The film was " and b[cut:] == "grim"
    fmt = ImplicitPromptFormat(marker=None)
    assert reason(fmt, {"chosen": "x yes", "rejected": "x yes and more"}) == "empty_completion"
    assert reason(fmt, {"chosen": "abc", "rejected": "xyz"}) == "no_shared_prompt"


def test_conversational_explicit_implicit_and_string_prompt_agree():
    user = {"role": "user", "content": "Hi?"}
    good, bad = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Go."}
    expected = {"prompt": [user], "completions": [[good], [bad]], "pairs": [[0, 1]], "tools": None}
    explicit = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    whole = {"chosen": [user, good], "rejected": [user, bad]}
    ufb = {
        "prompt": "Hi?",
        "chosen": [user, good],
        "rejected": [user, bad],
    }  # UltraFeedback-binarized
    assert ConversationalFormat()(explicit) == expected
    assert ConversationalFormat(columns={"prompt": None})(whole) == expected
    assert ConversationalFormat()(whole) == expected  # no prompt column at all: implicit
    assert ConversationalFormat()(ufb) == expected
    with_system = ConversationalFormat(system_prompt="Be brief.")(explicit)
    assert with_system["prompt"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"},
            "unknown_role_prompt",
        ),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "empty_conversation_prompt"),
        ({"prompt": "p", "chosen": [], "rejected": "b"}, "empty_conversation_chosen"),
        ({"prompt": "p", "chosen": [{"role": "user"}], "rejected": "b"}, "wrong_type_chosen"),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "u"}], "rejected": "b"},
            "completion_not_assistant",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen_equals_rejected"),
    ],
)
def test_conversational_faults(row, expected):
    assert reason(ConversationalFormat(), row) == expected


def test_ranked_all_pairs_hand_worked_with_ties_counted():
    # scores 3, 1, 3, 0: strict pairs (0,1) (0,3) (1,3) (2,1) (2,3); (0,2) is a tie.
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [3, 1, 3, 0]}
    out = RankedFormat(mode="all_pairs")(row)
    assert out["completions"] == ["a", "b", "c", "d"]
    assert sorted(map(tuple, out["pairs"])) == [(0, 1), (0, 3), (1, 3), (2, 1), (2, 3)]
    assert out["notes"] == {"tied_pairs": 1}


def test_ranked_best_vs_worst_keeps_only_used_completions():
    row = {"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 5, 0]}
    out = RankedFormat(mode="best_vs_worst")(row)
    assert out["completions"] == ["b", "c"] and out["pairs"] == [[0, 1]]
    ranks = {"prompt": "p", "completions": ["a", "b", "c"], "scores": [2, 1, 3]}  # 1 = best
    out = RankedFormat(mode="best_vs_worst", higher_is_better=False)(ranks)
    assert out["completions"] == ["b", "c"]


def test_ranked_best_vs_random_is_strictly_worse_and_deterministic():
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [0, 9, 9, 1]}
    fmt = RankedFormat(mode="best_vs_random", seed=3)
    first = fmt(row)
    assert first == fmt(row)
    ((w, lose),) = first["pairs"]
    assert first["completions"][w] == "b" and first["completions"][lose] in ("a", "d")
    losers = set()
    for seed in range(20):
        out = RankedFormat(mode="best_vs_random", seed=seed)(row)
        losers.add(out["completions"][out["pairs"][0][1]])
    assert losers == {"a", "d"}  # every strictly worse completion can be drawn, never the tie "c"


def test_ranked_dict_completions_choice_and_columns():
    uf = {
        "instruction": "p",
        "completions": [
            {"response": "x", "overall_score": 2.5},
            {"response": "y", "overall_score": 7.0},
        ],
    }
    fmt = RankedFormat(text_key="response", score_key="overall_score", columns={"prompt": "instruction"})
    assert fmt(uf)["completions"] == ["x", "y"] and fmt(uf)["pairs"] == [[1, 0]]
    tldr = {
        "info": {"title": "T", "post": "P"},
        "summaries": [{"text": "s0"}, {"text": "s1"}],
        "choice": 1,
    }
    fmt = RankedFormat(
        text_key="text",
        choice_column="choice",
        columns={"completions": "summaries"},
        prompt_template="TITLE: {info[title]}\nPOST: {info[post]}\nTL;DR:",
    )
    out = fmt(tldr)
    assert out["prompt"] == "TITLE: T\nPOST: P\nTL;DR:" and out["pairs"] == [[1, 0]]
    assert reason(fmt, {**tldr, "info": {"title": "T", "post": None}}) == "null_info[post]"
    shp = {"history": "h", "human_ref_A": "ra", "human_ref_B": "rb", "score_A": 1, "score_B": 4}
    fmt = RankedFormat(
        completion_columns=["human_ref_A", "human_ref_B"],
        score_columns=["score_A", "score_B"],
        prompt_template="{history}\n\n",
    )
    assert fmt(shp)["pairs"] == [[1, 0]]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [2, 2]},
            "fewer_than_two_distinct_scores",
        ),
        ({"prompt": "p", "completions": ["a"], "scores": [2]}, "fewer_than_two_completions"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [2, None]}, "null_score"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [2, "x"]}, "wrong_type_score"),
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [2]},
            "scores_do_not_match_completions",
        ),
        ({"prompt": "p", "completions": ["a", "a"], "scores": [2, 1]}, "chosen_equals_rejected"),
    ],
)
def test_ranked_faults(row, expected):
    assert reason(RankedFormat(), row) == expected


def test_auto_detection_and_refusal():
    cases = {
        "standard": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "implicit_prompt": {"chosen": "a", "rejected": "b"},
        "conversational": {"chosen": [{"role": "user", "content": "x"}], "rejected": []},
        "ranked": {"prompt": "p", "completions": ["a", "b"], "scores": [1, 0]},
    }
    for name, row in cases.items():
        fmt = AutoFormat()
        assert type(fmt.detect([row, {"chosen": None}])) is type(resolve_format(name))
    mapped = AutoFormat(columns={"prompt": "question"})
    assert isinstance(mapped.detect([{"question": "q", "chosen": "a", "rejected": "b"}]), StandardFormat)
    with pytest.raises(ValueError, match="cannot detect the format"):
        AutoFormat().detect([cases["standard"], cases["implicit_prompt"]])
    with pytest.raises(ValueError, match="cannot detect the format"):
        AutoFormat().detect([{"question": "q", "answer": "a"}])


def test_auto_detection_tolerates_a_minority_of_bad_rows(capsys):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(40)]
    rows[7]["prompt"] = 7  # an int prompt says nothing about the layout
    rows[9].pop("prompt")  # one row without a prompt looks implicit: outvoted
    assert isinstance(AutoFormat().detect(rows, "f.jsonl"), StandardFormat)
    assert "detected format 'standard' (38 of 40 rows" in capsys.readouterr().out
    # a real mix is refused: 30 standard vs 10 implicit is below the 80% majority
    mixed = rows[:30] + [{"chosen": "a", "rejected": "b"}] * 10
    with pytest.raises(ValueError, match="cannot detect the format"):
        AutoFormat().detect(mixed)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf"), 10**400])
@pytest.mark.parametrize("mode", ["all_pairs", "best_vs_worst", "best_vs_random"])
def test_ranked_nonfinite_score_invalidates_the_row(score, mode):
    # A NaN compares false with everything: before, its completion silently left every pair
    # (all_pairs), or best_vs_random crashed on an empty choice.
    row = {"prompt": "p", "completions": ["a", "b", "c"], "scores": [score, 1, 0]}
    assert reason(RankedFormat(mode=mode), row) == "nonfinite_score"
    dicts = {"prompt": "p", "completions": [{"t": "a", "s": 1}, {"t": "b", "s": score}]}
    assert reason(RankedFormat(mode=mode, text_key="t", score_key="s"), dicts) == "nonfinite_score"


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        (StandardFormat(), {"prompt": "p", "chosen": "Good  film.", "rejected": "Good film. "}),
        (
            ImplicitPromptFormat(),
            {"chosen": "\n\nHuman: x\n\nAssistant: a b", "rejected": "\n\nHuman: x\n\nAssistant: ab"},
        ),
        (
            ConversationalFormat(),
            {
                "prompt": "p",
                "chosen": [{"role": "assistant", "content": "Yes, sure."}],
                "rejected": [{"role": "assistant", "content": "Yes,\nsure."}],
            },
        ),
        (RankedFormat(), {"prompt": "p", "completions": ["a b", "ab", " a b"], "scores": [3, 2, 1]}),
    ],
)
def test_pairs_that_differ_only_by_whitespace_are_invalid(fmt, row):
    assert reason(fmt, row) == "differ_only_by_whitespace"


def test_ranked_drops_only_the_pairs_without_signal_and_counts_them():
    # scores 3, 2, 1, 0 -> all_pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); completions 1 and 2
    # ("b", "b ") are the same text up to whitespace, so only pair (1,2) goes.
    row = {"prompt": "p", "completions": ["a", "b", "b ", "d"], "scores": [3, 2, 1, 0]}
    out = RankedFormat()(row)
    pairs = {tuple(out["completions"][i] for i in p) for p in out["pairs"]}
    assert pairs == {("a", "b"), ("a", "b "), ("a", "d"), ("b", "d"), ("b ", "d")}
    assert out["notes"] == {"whitespace_only_pairs": 1}
    same = {"prompt": "p", "completions": ["a", "b", "b"], "scores": [3, 2, 1]}
    assert RankedFormat()(same)["notes"] == {"identical_pairs": 1}
