"""Ground-truth reward functions: ``texts -> (N,) float tensor``, chosen by config (``reward=``).

* :class:`VaderReward` — VADER's compound score in [-1, 1] (lexicon shipped with the package,
  scores offline): the miniature's reward.
* :class:`ClassifierReward` — probability of the positive label under a HF sequence classifier
  (paper: ``siebert/sentiment-roberta-large-english``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class RewardFunction:
    """Interface: score full texts (prompt + completion); higher is better."""

    #: Axis label of plots.
    name: str = "reward"

    def __call__(self, texts: list[str]) -> Tensor:
        raise NotImplementedError


class VaderReward(RewardFunction):
    """VADER compound sentiment (Hutto & Gilbert 2014), in [-1, 1]."""

    name = "VADER compound"

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:  # an optional extra
            raise ImportError(
                "VaderReward needs vaderSentiment: pip install 'dpo-lightning[sentiment]'"
            ) from err
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> Tensor:
        return torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts])


class ClassifierReward(RewardFunction):
    """p(positive | text) under a HF ``AutoModelForSequenceClassification``.

    Args:
        name_or_path: hub id or local ``save_pretrained`` folder of the classifier.
        positive_label: the label name (``config.id2label``) whose probability is the reward.
        batch_size: texts per forward.
        max_length: classifier input length (longer texts are truncated).
        device: ``cpu`` / ``cuda`` / null (cuda when available).
    """

    name = "p(positive)"

    def __init__(
        self,
        name_or_path: str,
        positive_label: str = "POSITIVE",
        batch_size: int = 64,
        max_length: int = 512,
        device: str | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(self.device).eval()
        labels = {v: int(k) for k, v in self.model.config.id2label.items()}
        if positive_label not in labels:
            raise ValueError(
                f"reward.positive_label={positive_label!r} is not a label of {name_or_path!r}; "
                f"its labels are {sorted(labels)}"
            )
        self.positive = labels[positive_label]
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            probs = self.model(**enc).logits.float().softmax(-1)  # (b, labels)
            out.append(probs[:, self.positive].cpu())
        return torch.cat(out) if out else torch.zeros(0)
