"""Export a run folder to a Hugging Face checkpoint, to continue in transformers and TRL.

The kit's GPT has GPT-2's shape, so it maps onto `GPT2LMHeadModel` tensor for tensor; the
reward model maps onto `GPT2ForSequenceClassification` with one label. What has to be
translated (checked against transformers 5.23's GPT-2, tests/test_export.py):

  - GELU: the kit's MLP calls the exact erf GELU; GPT-2's checkpoints use the tanh
    approximation ("gelu_new"). config.json says "activation_function": "gelu", the exact one.
  - Conv1D: GPT-2 stores c_attn, c_proj and c_fc as Conv1D, y = x @ W + b with W (in, out);
    nn.Linear keeps W (out, in). Those four weights are transposed.
  - Tied embeddings: lm_head is the token embedding; it is written once (tie_word_embeddings).
  - LayerNorm eps 1e-5 (torch's default, GPT-2's too), attention scaled by 1/sqrt(head size),
    q, k, v side by side in c_attn in that order: the same on both sides. `bias=False`
    models get zero biases, which computes the same thing.
  - Positions: the kit counts positions over real tokens (`cumsum(mask) - 1`); GPT-2's
    forward counts columns. Right-padded batches agree as they are; a left-padded batch needs
    `position_ids` passed to forward (`generate` computes them from the attention mask itself).

The tokenizer becomes a `PreTrainedTokenizerFast` (a tokenizer.json for the `tokenizers`
library): the kit's tiktoken ranks turned into a byte-level BPE vocabulary and merge list,
the same pre-tokenizer regex, and <|endoftext|> as a special token. Its pad token is
<|endoftext|>, as in the kit, which pads with EOS and masks padding by the attention mask.

The reward model needs two changes that compute the same number:
  - the kit scores the last real token, which is the EOS after the completion;
    GPT2ForSequenceClassification scores the last token that is not the pad token. With pad =
    EOS it would read the token before the EOS, so the reward model gets its own pad token
    <|pad|>, one more id (its embedding row is zero and never attended to);
  - the kit's score is `gain * (w·h + b) + bias`; the classification head has no bias. The
    constant is folded into the final LayerNorm's bias, which only the head reads:
    w' = gain·w and ln_f.bias' = ln_f.bias + c·w'/|w'|² with c = gain·b + bias, so that
    w'·h' = w'·h + c.

Export needs the `hf` extra (`pip install -e ".[hf]"`: safetensors, tokenizers, and
transformers to load the result); the kit itself does not.
"""
import os
from pathlib import Path

import torch

from minirlhf.checkpoints import model_config
from minirlhf.config import ConfigError
from minirlhf.files import atomic_write_text, load_torch, write_json
from minirlhf.tokenizer import DEFAULT_RANKS_PATH, EOT, PATTERN, load_ranks

PAD = "<|pad|>"  # the reward model's pad token (see the module docstring)
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


# ---------------------------------------------------------------------------
# The run folder


def read_model_run(run_dir):
    """(kind, GPTConfig, state_dict) of a stage folder; kind is "lm" (SFT, PPO, DPO policy)
    or "reward" (a reward model: a GPT trunk, a scalar head and its normalisation)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such folder")
    if not (run_dir / "model.pt").exists():
        stages = sorted(p.name for p in run_dir.iterdir() if (p / "model.pt").exists())
        hint = f"; it holds the stages {', '.join(stages)}: pass one, e.g. --model {run_dir / stages[-1]}" \
            if stages else ""
        raise ConfigError(f"{run_dir} is not a model run (no model.pt){hint}")
    config = model_config(run_dir)
    state = load_torch(run_dir / "model.pt")
    if not isinstance(state, dict):
        raise ConfigError(f"{run_dir}/model.pt holds a {type(state).__name__}, not a state_dict")
    if "reward_gain" in state:
        return "reward", config, state
    if "head.weight" in state:
        raise ConfigError(f"{run_dir} holds a value model, which transformers has no class for; "
                          "export the policy or the reward model")
    return "lm", config, state


# ---------------------------------------------------------------------------
# The model: kit names -> GPT-2 names


def gpt2_state_dict(state, config, prefix=""):
    """The kit's GPT state_dict (keys under `prefix`) as GPT2Model tensors under
    "transformer.", Conv1D weights transposed and missing biases (bias=False) as zeros."""
    C = config.n_embd
    out = {"transformer.wte.weight": state[prefix + "wte.weight"],
           "transformer.wpe.weight": state[prefix + "wpe.weight"]}
    names = [("ln_1", False, C), ("attn.c_attn", True, 3 * C), ("attn.c_proj", True, C),
             ("ln_2", False, C), ("mlp.c_fc", True, 4 * C), ("mlp.c_proj", True, C)]
    for i in range(config.n_layer):
        for name, is_linear, width in names:
            kit, hf = f"{prefix}blocks.{i}.{name}", f"transformer.h.{i}.{name}"
            weight = state[kit + ".weight"]
            out[hf + ".weight"] = weight.t() if is_linear else weight  # Conv1D: (in, out)
            out[hf + ".bias"] = state.get(kit + ".bias", torch.zeros(width))
    out["transformer.ln_f.weight"] = state[prefix + "ln_f.weight"]
    out["transformer.ln_f.bias"] = state.get(prefix + "ln_f.bias", torch.zeros(C))
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def fold_reward_head(tensors, state):
    """Add GPT2ForSequenceClassification's `score.weight` (1, C) to `tensors`, folding the
    kit's head bias and normalisation into ln_f's bias (module docstring). Computed in float64."""
    gain, bias = state["reward_gain"].double(), state["reward_bias"].double()
    w = gain * state["head.weight"].double()  # (1, C)
    c = gain * state["head.bias"].double() + bias  # (1,)
    norm2 = (w * w).sum()
    if norm2 == 0:
        raise ConfigError("the reward head's weights are all zero: there is no reward to export")
    ln_bias = tensors["transformer.ln_f.bias"].double() + c * w[0] / norm2  # (C,)
    tensors["transformer.ln_f.bias"] = ln_bias.float()
    tensors["score.weight"] = w.float()
    return tensors


def hf_config(config, kind, eot_id, pad_id):
    """config.json of a GPT2LMHeadModel (kind "lm") or a one-label GPT2ForSequenceClassification."""
    hf = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel" if kind == "lm" else "GPT2ForSequenceClassification"],
        "vocab_size": config.vocab_size + (kind == "reward"),  # the reward model's <|pad|>
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu",  # exact erf GELU, as F.gelu; GPT-2's own is "gelu_new"
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True,  # 1/sqrt(head size)
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id,
        "dtype": "float32",
    }
    if kind == "reward":
        hf.update(num_labels=1, id2label={"0": "reward"}, label2id={"reward": 0}, problem_type="regression")
    return hf


# ---------------------------------------------------------------------------
# The tokenizer: tiktoken ranks -> a byte-level BPE tokenizer.json


def byte_alphabet():
    """GPT-2's byte-level alphabet, {byte: one printable character}: the printable Latin-1
    bytes stand for themselves, every other byte for chr(256 + n), n counting them in order.
    It is what the `tokenizers` ByteLevel pre-tokenizer applies before BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, n = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + n)
            n += 1
    return alphabet


def vocab_and_merges(ranks):
    """The BPE vocabulary {token string: id} and merge list [(left, right)] equivalent to
    tiktoken's ranks. tiktoken merges, at each step, the adjacent pair whose concatenation
    has the lowest rank, whichever two pieces make it; so every split of a token into two
    tokens is a merge, ordered by the rank of the token it makes."""
    alphabet = byte_alphabet()
    text = {tok: "".join(alphabet[b] for b in tok) for tok in ranks}  # bytes -> byte-level string
    vocab = {text[tok]: rank for tok, rank in ranks.items()}
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        for i in range(1, len(tok)):
            if tok[:i] in ranks and tok[i:] in ranks:
                merges.append((text[tok[:i]], text[tok[i:]]))
    return vocab, merges


def build_tokenizer(ranks, pad_token=None):
    """A `tokenizers.Tokenizer` that gives tiktoken's ids: the regex split, then bytes to the
    byte-level alphabet, then BPE; <|endoftext|> (and the reward model's pad) are special."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = vocab_and_merges(ranks)
    vocab[EOT] = len(ranks)  # the id tiktoken gives it (tokenizer.load_tokenizer)
    if pad_token is not None:
        vocab[pad_token] = len(ranks) + 1
    # ignore_merges: a piece that is one token is taken whole, as tiktoken does first
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in [EOT] + ([pad_token] if pad_token else [])])
    return tok


def tokenizer_config(pad_token, block_size):
    """tokenizer_config.json: load tokenizer.json as it is (no GPT-2 class rebuilding it)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
            "pad_token": pad_token, "model_max_length": block_size, "padding_side": "right",
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}


# ---------------------------------------------------------------------------
# export


def export(run_dir, out_dir, overwrite=False, ranks_path=DEFAULT_RANKS_PATH):
    """Write run_dir's model as a Hugging Face checkpoint in out_dir: config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json. Returns the kind, "lm" or "reward"."""
    try:
        from safetensors.torch import save_file
        import tokenizers  # noqa: F401  (fail here, before anything is written)
    except ImportError as e:
        raise ConfigError(f"export needs the hf extra ({e.name} is missing): pip install -e \".[hf]\"") from None
    kind, config, state = read_model_run(run_dir)
    ranks = load_ranks(ranks_path)
    if len(ranks) + 1 != config.vocab_size:
        raise ConfigError(f"{run_dir}: the model's vocabulary ({config.vocab_size}) does not match the "
                          f"tokenizer's ({len(ranks) + 1}); was data/ retrained after this model?")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it")
        for name in FILES:  # only what an export writes: --out might be any folder
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    eot_id = len(ranks)
    if kind == "lm":
        tensors, pad_token, pad_id = gpt2_state_dict(state, config), EOT, eot_id
    else:
        tensors = fold_reward_head(gpt2_state_dict(state, config, prefix="trunk."), state)
        wte = tensors["transformer.wte.weight"]
        tensors["transformer.wte.weight"] = torch.cat([wte, torch.zeros(1, wte.size(1))])  # <|pad|>'s row
        pad_token, pad_id = PAD, eot_id + 1
    tmp = out_dir / "model.safetensors.tmp"  # every file is written whole or not at all
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    write_json(out_dir / "config.json", hf_config(config, kind, eot_id, pad_id))
    tokenizer = build_tokenizer(ranks, None if kind == "lm" else PAD)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(pad_token, config.block_size))
    if kind == "lm":
        write_json(out_dir / "generation_config.json",
                   {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id})
    return kind
