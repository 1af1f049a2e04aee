"""minirlhf: RLHF built from scratch, small enough to read.

Read these to learn RLHF, in this order: model.py (the GPT), losses.py (every loss, as pure
functions), sft.py, collect.py and preferences.py (simulated labelers and their rankings),
reward.py, ppo.py, dpo.py, baselines.py (Preferred-FT, Best-of-N), evaluate.py and
experiments.py (the reward-vs-KL frontier).

Machinery a student may skip: config.py (configs, --set), runs.py (run folders, resume,
checkpoints, metric logs), files.py, optim.py, checkpoints.py, data.py, sampling.py,
tokenizer.py, pipeline.py (`run`), frontier_report.py, threads.py (CPU threads), __main__.py (the CLI); for
instructors, exercises.py and checks.py.

The names below are the public API (DESIGN.md); `from minirlhf import dpo_loss, train_dpo`.
"""
from minirlhf import threads  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
from minirlhf.baselines import BestOfNConfig, PreferredFTConfig, run_best_of_n, train_preferred_ft
from minirlhf.checkpoints import load_gpt, load_scalar_model
from minirlhf.collect import CollectConfig   # collect() itself: minirlhf.collect.collect (the module keeps the name)
from minirlhf.dpo import DPOConfig, train_dpo
from minirlhf.evaluate import evaluate_policy
from minirlhf.experiments import FrontierConfig, run_frontier
from minirlhf.losses import (AdaptiveKLController, bradley_terry_loss, dpo_loss, entropy, explained_variance, gae,
                             kl_penalized_rewards, kl_penalty, masked_mean, masked_whiten, ppo_policy_loss,
                             ppo_value_loss, ranking_loss, rpo_nll, sft_loss, token_logprobs)
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
from minirlhf.pipeline import run_pipeline
from minirlhf.ppo import PPOConfig, train_ppo
from minirlhf.preferences import Preferences, read_preferences
from minirlhf.reward import RewardConfig, train_reward_model
from minirlhf.sampling import generate, sequence_logprobs
from minirlhf.sft import SFTConfig, train_sft
from minirlhf.tokenizer import load_tokenizer

__all__ = [
    # losses and estimators (minirlhf.losses)
    "token_logprobs", "masked_mean", "masked_whiten", "sft_loss", "bradley_terry_loss", "ranking_loss",
    "kl_penalty", "kl_penalized_rewards", "gae", "ppo_policy_loss", "ppo_value_loss", "dpo_loss", "rpo_nll",
    "entropy", "explained_variance", "AdaptiveKLController",
    # the model, text in and out
    "GPT", "GPTConfig", "ScalarHeadModel", "load_tokenizer", "load_gpt", "load_scalar_model", "generate",
    "sequence_logprobs", "evaluate_policy",
    # the stages: a config dataclass and a function each
    "SFTConfig", "train_sft", "CollectConfig", "Preferences", "read_preferences",
    "RewardConfig", "train_reward_model", "PPOConfig", "train_ppo", "DPOConfig", "train_dpo",
    "PreferredFTConfig", "train_preferred_ft", "BestOfNConfig", "run_best_of_n",
    "run_pipeline", "FrontierConfig", "run_frontier",
]
