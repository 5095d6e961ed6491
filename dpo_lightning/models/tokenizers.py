"""Tokenizers: the real HF loader and an offline byte-level BPE for hub-less runs and tests."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dpo_lightning.data.synthetic import sentiment_corpus
from dpo_lightning.run.errors import UserError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# A minimal chat template (ChatML-like) so conversational data works offline too. It renders tool
# calling the way HF templates do (Hermes-style): the ``tools`` specs as a leading system turn,
# an assistant's ``tool_calls`` as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` after
# its text, ``tool`` results as their own turn. Without tools it renders exactly as before.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</s>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}{% set f = c['function'] if c['function'] is defined else c %}"
    "<tool_call>{{ {'name': f['name'], 'arguments': f['arguments']} | tojson }}</tool_call>"
    "{% endfor %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE in memory (deterministic for the same texts) with BOS/EOS/PAD.

    The prompt gets a BOS from the post-processor; completions are tokenised without special
    tokens and end with EOS (see :mod:`dpo_lightning.data.tokenize`).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def offline_sentiment_tokenizer(
    vocab_size: int = 512, n: int = 2000, seed: int = 0
) -> PreTrainedTokenizerFast:
    """The default experiment's tokenizer: a BPE trained on the generated sentiment corpus."""
    return train_bpe_tokenizer(sentiment_corpus(n, seed), vocab_size)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` plus a pad token when the tokenizer has none.

    Causal LMs often ship without a pad token; the EOS is used (padding is masked out of every
    loss and attention, so its id never matters) and the choice is logged.
    """
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # no such folder / files, an unreachable or unknown hub id
        first = " ".join(str(err).split())[:200]
        raise UserError(
            f"cannot load the tokenizer {name_or_path!r} ({first}): give a folder with tokenizer "
            "files or a reachable hub id (model.tokenizer; null: the one of model.name_or_path)"
        ) from err
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(
                f"tokenizer of {name_or_path!r} has neither a pad nor an eos token: "
                "set one in its tokenizer_config.json"
            )
        tok.pad_token = tok.eos_token
        print(f"[dpo_lightning] tokenizer {name_or_path!r} has no pad token: using eos {tok.eos_token!r}")
    return tok


def tokenizer_differences(policy: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase) -> list[str]:
    """Why ``other`` would not score the policy's token ids like the policy's tokenizer: ``[]``
    when both map every token (special and added ones included) to the same id.

    Compared by content, never identity: two tokenizers loaded from different folders with the
    same vocabulary are the same here. Special-token *roles* (which token is EOS) are not
    compared: a reference only scores the ids the policy's tokenizer produced, so an instruct
    tokenizer whose EOS is another token of the same vocabulary is still compatible.
    """
    if len(policy) != len(other):
        return [f"vocabulary sizes differ ({len(policy)} vs {len(other)} tokens)"]
    mine, theirs = policy.get_vocab(), other.get_vocab()
    if mine == theirs:
        return []
    for token in policy.all_special_tokens:
        if theirs.get(token) != mine.get(token):
            return [f"special token {token!r} has id {mine.get(token)} vs {theirs.get(token)}"]
    token = min(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
    return [f"token {token!r} has id {mine.get(token)} vs {theirs.get(token)}"]
