"""dpo_lightning: Direct Preference Optimization (https://arxiv.org/abs/2305.18290) on Lightning + Hydra."""

__version__ = "0.2.0"
