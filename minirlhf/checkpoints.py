"""Saving and loading models in run folders.

A stage's folder holds `model.pt` (a plain state_dict, written atomically and read back
with `torch.load(..., weights_only=True)`) and `config.json`, whose "model" entry is the
GPTConfig needed to rebuild the network before loading its weights, and whose "tokenizer" entry
is the fingerprint of the ranks file it was trained with (folders from before it was recorded
still load; only their vocabulary size is compared).
"""
import dataclasses
from pathlib import Path

from minirlhf.config import ConfigError
from minirlhf.files import load_torch, read_json, save_torch
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel


def save_model(model, out_dir):
    """Write the state_dict to out_dir/model.pt atomically."""
    save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(out_dir) / "model.pt")


def run_config(run_dir):
    """The dict a stage recorded in run_dir/config.json; a missing or damaged one is a one-line error."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ConfigError(f"{run_dir} is a file: give the run folder that holds model.pt and config.json "
                          f"({run_dir.parent})")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    config = read_json(run_dir / "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{run_dir}/config.json holds a {type(config).__name__}, not a JSON object")
    return config


def model_config(run_dir):
    """The GPTConfig a stage recorded in its config.json, its fields checked."""
    config = run_config(run_dir)
    entry = config.get("model")
    if not isinstance(entry, dict):
        raise ConfigError(f"{run_dir}/config.json has no 'model' entry: is this a minirlhf run folder?")
    fields = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    for key, value in entry.items():
        kind = fields.get(key)
        if kind is None:
            raise ConfigError(f"{run_dir}/config.json: unknown model field {key!r}")
        wanted = {"int": int, "float": (int, float), "bool": bool}.get(getattr(kind, "__name__", str(kind)), object)
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ConfigError(f"{run_dir}/config.json: model field {key} must be {kind if isinstance(kind, str) else kind.__name__}, "
                              f"got {value!r}")
    try:
        model = GPTConfig(**entry)
    except TypeError as e:
        raise ConfigError(f"{run_dir}/config.json: its 'model' entry is not a GPTConfig ({e})") from None
    sizes = {k: getattr(model, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or not 0 < v <= MAX_SIZE]
    if bad or model.n_embd % model.n_head:
        why = f"{bad[0]} must be in [1, {MAX_SIZE}]" if bad else "n_embd must be a multiple of n_head"
        raise ConfigError(f"{run_dir}/config.json: the model's shape is impossible ({why})")
    return model


MAX_SIZE = 65536   # no field of a model's shape is larger (block_size, widths, vocabulary) on a laptop


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
    """The run's GPTConfig; with a tokenizer, one other than the model's is refused before loading."""
    config = model_config(run_dir)
    if tokenizer is None:
        return config
    trained_with, current = run_config(run_dir).get("tokenizer"), getattr(tokenizer, "fingerprint", None)
    if trained_with is not None and current is not None and trained_with != current:
        raise ConfigError(f"{run_dir} was trained with tokenizer {trained_with}, but data/tokenizer.tiktoken is "
                          f"now {current}: was data/ retrained after this model? (retrain the model, or restore "
                          "the tokenizer it was trained with)")
    if tokenizer.n_vocab != config.vocab_size:
        raise ConfigError(f"{run_dir}: the model's vocabulary ({config.vocab_size}) does not match the "
                          f"tokenizer's ({tokenizer.n_vocab}); was data/ retrained after this model?")
    return config


def load_gpt(run_dir, device="cpu", tokenizer=None):
    """The GPT saved in `run_dir` (an SFT, PPO or DPO folder), in eval mode."""
    return _load_into(GPT(_checked_config(run_dir, tokenizer)), run_dir).to(device).eval()


def load_scalar_model(run_dir, device="cpu", tokenizer=None):
    """The ScalarHeadModel (reward or value model) saved in `run_dir`, in eval mode."""
    return _load_into(ScalarHeadModel(_checked_config(run_dir, tokenizer)), run_dir).to(device).eval()

