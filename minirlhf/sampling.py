"""Sampling completions for prompts, and the log-probabilities of sampled tokens.

Every stage that looks at a policy's behaviour (SFT evaluation, collecting preferences,
PPO rollouts, Best-of-N, the shared evaluation) goes through these few functions, so
they all tokenize, pad and mask the same way.
"""
import torch

from minirlhf.data import encode_prompt, pad_left
from minirlhf.losses import token_logprobs


def generate(model, tokenizer, prompts, *, max_new_tokens, max_prompt_tokens, temperature=1.0,
             top_k=None, generator=None, drop_finished=True):
    """Sample one completion for each prompt (one batch).

    Returns (generation, completions): the model's Generation (tokens, attention_mask,
    response_mask, finished; each (B, T)) and the decoded completion strings without EOS.
    """
    device = next(model.parameters()).device
    ids = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    tokens, mask = pad_left(ids, tokenizer.eot_token)                     # (B, T0)
    out = model.generate(tokens.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, eos_token_id=tokenizer.eot_token,
                         generator=generator, drop_finished=drop_finished)
    completions = decode_responses(tokenizer, out.tokens, out.response_mask)
    return out, completions


def decode_responses(tokenizer, tokens, response_mask):
    """The text of each row's response tokens, EOS dropped."""
    texts = []
    for row, keep in zip(tokens.tolist(), response_mask.bool().tolist()):
        ids = [t for t, k in zip(row, keep) if k and t != tokenizer.eot_token]
        texts.append(tokenizer.decode(ids))
    return texts


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, *, batch_size=128, **kwargs):
    """Completions (strings) for many prompts, in batches of `batch_size`."""
    completions = []
    for start in range(0, len(prompts), batch_size):
        _, texts = generate(model, tokenizer, prompts[start:start + batch_size], **kwargs)
        completions.extend(texts)
    return completions


def response_logprobs(model, tokens, attention_mask, temperature=1.0):
    """Log-probs (B, T-1) of tokens[:, 1:] given their prefixes, logits divided by `temperature`.

    Position t of the result belongs to token t+1; multiply by response_mask[:, 1:] to keep
    the completion's tokens only.
    """
    logits = model(tokens[:, :-1], attention_mask[:, :-1])                 # (B, T-1, V)
    return token_logprobs(logits / temperature, tokens[:, 1:])             # (B, T-1)


def sequence_logprobs(model, tokens, attention_mask, response_mask, temperature=1.0):
    """Summed log-prob (B,) of each row's response tokens: log π(y | x)."""
    logps = response_logprobs(model, tokens, attention_mask, temperature)  # (B, T-1)
    return (logps * response_mask[:, 1:].to(logps.dtype)).sum(-1)


def trim_padding(tokens, attention_mask, *others):
    """Drop trailing columns where every row is padding (generation pads to a fixed width)."""
    width = int(attention_mask.sum(0).nonzero().max()) + 1
    return (tokens[:, :width], attention_mask[:, :width], *(t[:, :width] for t in others))
