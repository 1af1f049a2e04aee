"""Saving and loading models in run folders.

A stage's folder holds `model.pt` (a plain state_dict, written atomically and read back
with `torch.load(..., weights_only=True)`) and `config.json`, whose "model" entry is the
GPTConfig needed to rebuild the network before loading its weights.
"""
from pathlib import Path

from minirlhf.config import ConfigError
from minirlhf.files import load_torch, read_json, save_torch
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel


def save_model(model, out_dir):
    """Write the state_dict to out_dir/model.pt atomically."""
    save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(out_dir) / "model.pt")


def model_config(run_dir):
    """The GPTConfig a stage recorded in its config.json."""
    config = read_json(Path(run_dir) / "config.json")
    if "model" not in config:
        raise ConfigError(f"{run_dir}/config.json has no 'model' entry: is this a minirlhf run folder?")
    try:
        return GPTConfig(**config["model"])
    except TypeError as e:
        raise ConfigError(f"{run_dir}/config.json: its 'model' entry is not a GPTConfig ({e})") from None


def _load_into(model, run_dir):
    state = load_torch(Path(run_dir) / "model.pt")
    if not isinstance(state, dict):
        raise ConfigError(f"{run_dir}/model.pt holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ConfigError(f"{run_dir}/model.pt does not match its config.json ({str(e).splitlines()[0]})") from None
    return model


def _checked_config(run_dir, tokenizer):
    """The run's GPTConfig; with a tokenizer, a vocabulary mismatch is refused before loading."""
    config = model_config(run_dir)
    if tokenizer is not None and tokenizer.n_vocab != config.vocab_size:
        raise ConfigError(f"{run_dir}: the model's vocabulary ({config.vocab_size}) does not match the "
                          f"tokenizer's ({tokenizer.n_vocab}); was data/ retrained after this model?")
    return config


def load_gpt(run_dir, device="cpu", tokenizer=None):
    """The GPT saved in `run_dir` (an SFT, PPO or DPO folder), in eval mode."""
    return _load_into(GPT(_checked_config(run_dir, tokenizer)), run_dir).to(device).eval()


def load_scalar_model(run_dir, device="cpu", tokenizer=None):
    """The ScalarHeadModel (reward or value model) saved in `run_dir`, in eval mode."""
    return _load_into(ScalarHeadModel(_checked_config(run_dir, tokenizer)), run_dir).to(device).eval()

