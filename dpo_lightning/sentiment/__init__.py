"""The DPO paper's controlled-sentiment experiment (arXiv 2305.18290, §6.1 and Figure 2).

``dpo-sentiment`` (:mod:`dpo_lightning.sentiment.pipeline`) chains, inside one run directory:
corpus → base model → SFT → sample K completions per review prefix → label with a ground-truth
reward → DPO for each β → evaluate (mean reward and KL(π‖π_ref) on held-out prefixes) →
``frontier.csv`` / ``frontier.png``.
"""
