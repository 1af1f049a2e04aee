"""Sampling from a GPT: the token loop with a KV cache, completions for prompts, and the
log-probabilities of sampled tokens.

Every stage that looks at a policy's behaviour (SFT evaluation, collecting preferences,
PPO rollouts, Best-of-N, the shared evaluation) goes through these few functions, so
they all tokenize, pad and mask the same way; `sequence_logprobs` is the one log π(y|x)
that DPO, the evaluation's KL and PPO's reference (`response_logprobs`) use.

Deliberate simplifications: the KV cache grows by concatenation (clear; allocation is cheap at
these sizes); generation refuses to run past `block_size` instead of cropping the context,
since cropping would shift the learned positions.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minirlhf.data import encode_prompt, pad_left
from minirlhf.losses import token_logprobs


# ---------------------------------------------------------------------------
# The token loop

class SamplingError(ValueError):
    """The model's next-token distribution is not finite: nothing can be sampled from it."""


@dataclass
class Generation:
    """What `GPT.generate` returns; every tensor is (B, T0 + max_new_tokens) unless noted."""

    tokens: Tensor  #: the prompts as given, then the sampled tokens; eos_token_id after a row's EOS
    attention_mask: Tensor  #: long 0/1: the prompts' real tokens and sampled tokens up to and including EOS
    response_mask: Tensor  #: long 0/1: only the sampled tokens up to and including EOS
    finished: Tensor  #: (B,) bool, True where the row emitted EOS
    #: (B, steps run, V) raw next-token logits, with return_logits=True; 0 once a row has left the
    #: working batch after its EOS
    logits: Optional[Tensor] = None


def sample_next_token(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
    """logits (B, V) -> (B,) token ids. temperature 0 is greedy argmax; top_k keeps only the
    k most likely tokens (Fan et al. 2018)."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    # Inverse-CDF sampling: the first token whose cumulative probability reaches u ~ U(0, total].
    # One uniform per row; torch.multinomial draws one exponential per row AND token, which made
    # sampling 1024 reviews take a third longer (benchmarks/bench_preferences.py).
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V), cdf[:, -1] is 1 up to round-off
    if not torch.isfinite(cdf[:, -1]).all():
        raise SamplingError("cannot sample: the next-token logits contain NaN or inf (has training diverged, "
                            "or is the temperature too small?)")
    # the uniforms come from the generator's own device (the kit's generators live on the CPU), so the same
    # seed draws the same samples on every device, and a CUDA/MPS run never mixes devices in torch.rand
    draw_on = generator.device if generator is not None else cdf.device
    u = torch.rand(len(cdf), 1, generator=generator, device=draw_on).to(cdf.device)   # (B, 1)
    u = (1 - u) * cdf[:, -1:]                                                          # (B, 1), u > 0
    # A token of probability 0 adds nothing to the cdf, so an earlier index always reaches u first.
    return torch.searchsorted(cdf, u).squeeze(-1)  # (B,)


@torch.no_grad()
def generate_tokens(model, idx: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
                    temperature: float = 1.0, top_k: Optional[int] = None, eos_token_id: Optional[int] = None,
                    use_cache: bool = True, generator: Optional[torch.Generator] = None,
                    return_logits: bool = False, drop_finished: bool = True) -> Generation:
    """Sample max_new_tokens after each prompt of a left-padded batch.

    idx (B, T0) long; attention_mask (B, T0) 0/1 (None = no padding). A row that emits
    EOS keeps emitting eos_token_id as padding (attention 0); the loop stops early once
    every row has finished, and the result is padded to T0 + max_new_tokens. With
    use_cache=False the whole sequence is recomputed each step (the slow reference).
    drop_finished=False keeps finished rows in the working batch (same results for each
    row under greedy decoding; sampled rows draw other random numbers), for benchmarks.
    Uses the module's current mode: call `.eval()` first if dropout > 0.
    """
    B, T0 = idx.shape
    if T0 + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds block_size "
            f"{model.config.block_size}: shorten the prompts or generate fewer tokens")
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask.long()  # (B, T0)
    pad = 0 if eos_token_id is None else eos_token_id
    # The results, at full size: every row is pad (attention 0) after its EOS.
    out_tokens = F.pad(idx, (0, max_new_tokens), value=pad)  # (B, T0 + max_new_tokens)
    out_mask = F.pad(mask, (0, max_new_tokens), value=0)  # (B, T0 + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)  # (B,)
    out_logits = (torch.zeros(B, max_new_tokens, model.config.vocab_size, device=idx.device)
                      if return_logits else None)
    # The working batch: the rows still being extended (`rows`), with their tokens, mask
    # and cache. Finished rows leave it once they are a quarter of it: a batch of reviews
    # runs as long as its longest one, about twice the mean length.
    rows = torch.arange(B, device=idx.device)  # (b,) which rows of the batch are still being extended
    tokens, live_mask, done, past = idx, mask, finished.clone(), None  # (b, T), (b, T), (b,), cache
    steps = 0
    for t in range(max_new_tokens):
        if use_cache and past is not None:
            # only the newest token goes through the network; older keys/values are cached
            h, past = model._trunk(tokens[:, -1:], live_mask, past)  # (b, 1, C)
        else:
            h, past = model._trunk(tokens, live_mask)  # (b, T, C)
        logits = model.lm_head(h[:, -1, :])  # (b, V), predicts the next token
        next_token = sample_next_token(logits, temperature, top_k, generator)  # (b,)
        next_token = torch.where(done, pad, next_token)  # (b,), finished rows emit padding
        real = (~done).long()  # (b,), EOS itself is real
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (b, T + 1)
        live_mask = torch.cat([live_mask, real[:, None]], dim=1)  # (b, T + 1)
        out_tokens[rows, T0 + t], out_mask[rows, T0 + t] = next_token, real
        if return_logits:
            out_logits[rows, t] = logits
        steps = t + 1
        if eos_token_id is None:
            continue
        done = done | (next_token == eos_token_id)
        if done.all():
            break
        if drop_finished and 4 * int(done.sum()) >= len(rows):  # drop the finished rows from the work
            finished[rows[done]] = True
            keep = ~done
            rows, tokens, live_mask, done = rows[keep], tokens[keep], live_mask[keep], done[keep]
            if use_cache:
                    past = [(k[keep], v[keep]) for k, v in past]
    finished[rows[done]] = True
    response_mask = out_mask.clone()
    response_mask[:, :T0] = 0  # (B, T0 + max_new_tokens), sampled tokens only
    logits = out_logits[:, :steps] if return_logits else None  # (B, steps, V)
    return Generation(out_tokens, out_mask, response_mask, finished, logits)


# ---------------------------------------------------------------------------
# Text in, text out


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
