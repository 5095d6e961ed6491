"""``dpo-sentiment``: the DPO paper's controlled-sentiment experiment, all stages in one run dir.

    dpo-sentiment                                   # offline miniature (CPU, a few minutes)
    dpo-sentiment 'dpo.betas=[0.05,0.5]' sample.k=8 # Hydra overrides of any stage
    dpo-sentiment pipeline=paper                    # paper scale: gpt2-large, IMDb, siebert (GPU)

Stages (each reads the previous one's output folder, see :func:`run_pipeline`):

1. ``corpus/``  review texts (``corpus._target_``), saved as ``{train, validation}`` with ``text``;
2. ``base/``    the starting LM + tokenizer (``base.name_or_path``, or built from ``base.config``
   with a BPE trained on the corpus; a ``base.gguf_file`` is de-quantised and saved here);
3. ``sft/``     ``dpo-train stage=sft data=text`` on the corpus → ``sft/hf_model`` (= π_ref);
4. ``samples/`` K completions per training prefix from π_SFT, scored by ``reward``;
5. ``pairs/``   preference pairs (``label.pairing``) as a ``{train, validation}`` dataset;
6. ``dpo/beta_<β>/`` one ``dpo-train`` run per β from π_SFT (reference = π_SFT);
7. ``online/beta_<β>/`` one ``stage=online_dpo`` run per β on the same prefixes and the same
   number of reward calls (:mod:`dpo_lightning.sentiment.online`; ``online.betas=[]``: none);
8. ``frontier.csv`` / ``frontier.png`` / ``summary.json``: mean reward and KL(π‖π_ref) on
   held-out prefixes for SFT, best-of-N and every run, and whether the online curve is above
   the offline one (:func:`~dpo_lightning.sentiment.frontier.online_verdict`, printed).

Training stages call :func:`dpo_lightning.train.train` in-process with a config composed from
``conf/train.yaml`` and the stage's ``overrides`` list, so every ``dpo-train`` option applies.
Before the first stage runs, :func:`check_pipeline` checks the pipeline's own numbers, every β
and the composed config of every training stage, so a typo in the last stage fails in one line
(``dpo-sentiment: error: ...``, exit code 2) instead of after minutes of corpus, SFT and sampling.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import datasets
import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.tokenizers import load_tokenizer, train_bpe_tokenizer
from dpo_lightning.run.errors import ConfigError, hydra_errors, report_errors
from dpo_lightning.sentiment.corpus import review_prefixes
from dpo_lightning.sentiment.evaluate import (
    best_of_n_kl,
    best_of_n_reward,
    decode_completions,
    sample_and_score,
)
from dpo_lightning.sentiment.frontier import (
    online_verdict,
    plot_frontier,
    verdict_lines,
    write_frontier_csv,
)
from dpo_lightning.sentiment.label import preference_dataset, preference_rows
from dpo_lightning.sentiment.online import attach_reward_calls, run_online
from dpo_lightning.sentiment.sampling import encode_prompts, sample_completions
from dpo_lightning.sentiment.stages import check_pipeline, run_training, training_stages
from dpo_lightning.train import CONF_DIR


# -- stages ------------------------------------------------------------------------------------
def make_corpus(cfg: DictConfig, run: Path) -> tuple[list[str], list[str]]:
    """Save the SFT corpus; return (training texts, held-out texts for eval prompts)."""
    texts = list(instantiate(cfg.corpus)["text"])
    n_eval = cfg.prompts.n_eval
    if len(texts) <= n_eval + 2:
        raise ConfigError(f"corpus has {len(texts)} texts: need more than prompts.n_eval + 2 = {n_eval + 2}")
    train_texts, eval_texts = texts[:-n_eval], texts[-n_eval:]
    n_val = max(1, len(train_texts) // 50)
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": train_texts[n_val:]}),
        validation=datasets.Dataset.from_dict({"text": train_texts[:n_val]}),
    ).save_to_disk(str(run / "corpus"))
    return train_texts, eval_texts


def make_base(cfg: DictConfig, run: Path, texts: list[str]) -> str:
    """The starting model: a hub id / folder as is, else built (or de-quantised) into ``base/``."""
    base = cfg.base
    if base.name_or_path and not base.get("gguf_file"):
        return base.name_or_path
    out = run / "base"
    if base.name_or_path:  # GGUF: transformers de-quantises; save plain weights for every stage
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base.name_or_path, gguf_file=base.gguf_file)
        model = load_causal_lm(base.name_or_path, gguf_file=base.gguf_file, dtype=base.dtype)
    else:
        tokenizer = train_bpe_tokenizer(texts, base.tokenizer_vocab_size)
        model = load_causal_lm(
            config=OmegaConf.to_container(base.config), vocab_size=len(tokenizer), seed=cfg.seed
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_pairs(cfg: DictConfig, run: Path, sft_path: Path, prompts: list[str], reward) -> dict[str, Any]:
    """Sample K completions per prompt from π_SFT, score them, save ``samples/`` and ``pairs/``."""
    tokenizer = load_tokenizer(str(sft_path))
    model = load_causal_lm(str(sft_path)).to(_device())
    s = cfg.sample
    ids = sample_completions(
        model,
        tokenizer,
        encode_prompts(tokenizer, prompts),
        s.k,
        s.max_new_tokens,
        s.batch_size,
        s.temperature,
        seed=cfg.seed,
    )
    texts = decode_completions(tokenizer, ids)
    scores = (
        reward([p + c for p, row in zip(prompts, texts, strict=True) for c in row])
        .view(len(prompts), s.k)
        .tolist()
    )
    datasets.Dataset.from_dict({"prompt": prompts, "completions": texts, "scores": scores}).save_to_disk(
        str(run / "samples")
    )
    rows = preference_rows(prompts, texts, scores, instantiate(cfg.label.pairing))
    preference_dataset(rows, cfg.label.val_fraction, cfg.seed).save_to_disk(str(run / "pairs"))
    return {
        "prompts": len(prompts),
        "completions": len(prompts) * s.k,
        "pairs": len(rows),
        "mean_sample_reward": float(torch.tensor(scores).mean()),
    }


def evaluate_all(
    cfg: DictConfig,
    run: Path,
    sft_path: Path,
    policies: dict[tuple[str, float], Path],
    prompts: list[str],
    reward,
) -> list[dict[str, Any]]:
    """Frontier rows: SFT and best-of-N from N samples of π_SFT, then each trained policy
    (``{(label prefix, β): path}``: ``dpo_beta_`` offline, ``online_beta_`` online)."""
    e, device = cfg.evaluate, _device()
    tokenizer = load_tokenizer(str(sft_path))
    prompt_ids = encode_prompts(tokenizer, prompts)
    reference = load_causal_lm(str(sft_path)).to(device)
    args = dict(
        tokenizer=tokenizer,
        prompts=prompts,
        prompt_ids=prompt_ids,
        reward=reward,
        max_new_tokens=cfg.sample.max_new_tokens,
        batch_size=cfg.sample.batch_size,
        seed=cfg.seed + 1,
    )
    sft = sample_and_score(reference, None, k=e.best_of_n, **args)
    n = e.best_of_n
    rows = [
        {
            "label": "sft",
            "beta": None,
            "reward": sft.reward,
            "kl": 0.0,
            "reward_std": float(sft.rewards.std()),
            "reward_se": prompt_se(sft.rewards),
            "n_samples": sft.rewards.numel(),
        },
        {
            "label": "best_of_n",
            "beta": None,
            "reward": best_of_n_reward(sft.rewards),
            "kl": best_of_n_kl(n),
            "n": n,
            "reward_std": float(sft.rewards.max(1).values.std()),
            "reward_se": prompt_se(sft.rewards.max(1, keepdim=True).values),
            "n_samples": sft.rewards.numel(),
        },
    ]
    _write_examples(run / "eval" / "sft.jsonl", sft)
    for (prefix, beta), path in policies.items():
        policy = load_causal_lm(str(path)).to(device)
        res = sample_and_score(policy, reference, k=e.samples_per_prompt, **args)
        label = f"{prefix}{beta:g}"
        rows.append(
            {
                "label": label,
                "beta": beta,
                "reward": res.reward,
                "kl": res.kl,
                "reward_std": float(res.rewards.std()),
                "reward_se": prompt_se(res.rewards),
                "n_samples": res.rewards.numel(),
            }
        )
        _write_examples(run / "eval" / f"{label}.jsonl", res)
    return rows


def prompt_se(rewards: torch.Tensor) -> float:
    """Standard error of the mean reward over (N prompts, k samples), prompts as the unit: the
    k samples of one prompt are not independent."""
    per_prompt = rewards.float().mean(dim=1)
    return float(per_prompt.std() / per_prompt.numel() ** 0.5)


def _write_examples(path: Path, res, n: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(min(n, len(res.prompts))):
            f.write(
                json.dumps(
                    {
                        "prompt": res.prompts[i],
                        "completion": res.completions[i][0],
                        "reward": float(res.rewards[i, 0]),
                        "log_ratio": float(res.log_ratios[i, 0]),
                    }
                )
                + "\n"
            )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the chain ---------------------------------------------------------------------------------
def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage in ``cfg.paths.output_dir``; returns (and writes) ``summary.json``."""
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    start, times = time.perf_counter(), {}
    load_start = list(os.getloadavg())  # the machine may be shared: timings mean little without it

    def tick(name: str) -> None:
        times[name] = round(time.perf_counter() - start - sum(times.values()), 2)
        print(f"[dpo-sentiment] {name} done ({times[name]:.1f} s)")

    check_pipeline(cfg, run)  # every stage's settings, before the first one runs
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    reward = instantiate(cfg.reward)  # fail on a missing reward package before any training
    train_texts, eval_texts = make_corpus(cfg, run)
    base = make_base(cfg, run, train_texts)
    tick("corpus+base")
    _, overrides, out_dir, extra = training_stages(cfg, run, base, run / "sft" / "hf_model")[0]
    sft = run_training(overrides, out_dir, extra)
    tick("sft")
    tokenizer = load_tokenizer(str(sft))
    p = cfg.prompts
    train_prompts = review_prefixes(train_texts[: p.n_train], tokenizer, p.min_tokens, p.max_tokens, cfg.seed)
    eval_prompts = review_prefixes(eval_texts, tokenizer, p.min_tokens, p.max_tokens, cfg.seed + 1)
    data_stats = make_pairs(cfg, run, sft, train_prompts, reward)
    tick("sample+label")
    dpo = {}
    for beta, (_, overrides, out_dir, extra) in zip(
        cfg.dpo.betas, training_stages(cfg, run, base, sft)[1:], strict=True
    ):
        dpo[float(beta)] = run_training(overrides, out_dir, extra)
    tick("dpo")
    held = train_texts[p.n_train : p.n_train + cfg.online.val_prompts]  # in no other split
    held = review_prefixes(held, tokenizer, p.min_tokens, p.max_tokens, cfg.seed + 2)
    online, online_stats = run_online(cfg, run, sft, train_prompts, held, run_training)
    tick("online")
    policies = {("dpo_beta_", b): path for b, path in dpo.items()} | {
        ("online_beta_", b): path for b, path in online.items()
    }
    rows = evaluate_all(cfg, run, sft, policies, eval_prompts, reward)
    attach_reward_calls(rows, data_stats["completions"], online_stats)  # each point's data cost
    write_frontier_csv(rows, run / "frontier.csv")
    plot_frontier(rows, run / "frontier.png", getattr(reward, "name", "reward"), cfg.get("title"))
    tick("evaluate")
    verdict = online_verdict(rows) if online else None
    summary = {
        "run_dir": str(run),
        "points": rows,
        "data": data_stats,
        "online": online_stats,
        "verdict": verdict,
        "stage_seconds": times,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "loadavg": {"start": load_start, "end": list(os.getloadavg())},
        "frontier_csv": str(run / "frontier.csv"),
        "frontier_png": str(run / "frontier.png"),
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in rows:
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        calls = "" if r.get("reward_calls") is None else f" reward calls={r['reward_calls']}"
        print(
            f"[dpo-sentiment] {r['label']:>16} β={beta:<5} reward={r['reward']:.4f} KL={r['kl']:.3f}{calls}"
        )
    for line in verdict_lines(verdict) if verdict else []:
        print(f"[dpo-sentiment] {line}")
    print(
        f"[dpo-sentiment] wrote {run / 'frontier.csv'} and {run / 'frontier.png'} "
        f"in {summary['wall_seconds']:.0f} s"
    )
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sentiment")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors("dpo-sentiment"):  # known failures: one line on stderr, exit code 2
        run_pipeline(cfg)


def main() -> None:
    """``dpo-sentiment``: bad overrides fail in one line, too."""
    with hydra_errors(CONF_DIR, prog="dpo-sentiment", config_name="sentiment"):
        hydra_main()


if __name__ == "__main__":
    main()
