"""A tiny GPT, its KV-cache sampler, and the scalar-head models (reward and value).

The network is nanoGPT-shaped (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"): token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention and a 4x GELU MLP, a final LayerNorm, and an output layer tied to the token
embedding (Press & Wolf 2017).

Shapes: B batch, T tokens, V vocabulary, C = n_embd, nh heads, hs = C // nh head size.

Padding. Every forward takes an `attention_mask` (B, T) of 0/1 (None = all real). RLHF
batches are padded on both sides at once: prompts are LEFT-padded so that every prompt
ends at the same column and generation appends to all rows together, and sequences are
RIGHT-padded after a row emits EOS. Two rules make a padded row compute exactly what the
unpadded row computes:
  - position ids are counted over real tokens only, `cumsum(mask) - 1`, so left padding
    does not shift the positions of the real tokens;
  - attention is causal AND key-is-real. Each position may also attend to itself, so no
    softmax row is empty (SDPA returns NaN for a fully masked row); the outputs at pad
    positions are therefore garbage, and every loss must mask them out.

Deliberate simplifications:
  - the KV cache grows by concatenation (clear; allocation is cheap at these sizes);
  - generation refuses to run past `block_size` instead of cropping the context, since
    cropping would shift the learned positions;
  - the reference attention applies no attention dropout (it exists to check SDPA).
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    """Sizes of the model; the defaults train on a laptop CPU in seconds."""

    #: number of token ids, special tokens included
    vocab_size: int = 512
    #: longest sequence the model can see, prompt + completion (learned positions)
    block_size: int = 96
    #: number of transformer blocks
    n_layer: int = 4
    #: attention heads per block (must divide n_embd)
    n_head: int = 4
    #: width C of the residual stream
    n_embd: int = 128
    #: dropout probability everywhere; keep 0 for RLHF, where log-probs must be repeatable
    dropout: float = 0.0
    #: biases in Linear and LayerNorm layers, as in GPT-2
    bias: bool = True


# ---------------------------------------------------------------------------
# Masks and attention


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counted over real tokens: a left-padded row gets 0, 1, 2... from its
    first real token. Pad positions get a clamped, harmless value."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)


def build_attention_mask(attention_mask: Tensor, q_len: int) -> Tensor:
    """The (B, 1, Tq, Tk) bool mask, True where a query may look at a key.

    attention_mask (B, Tk) 0/1 over all keys; the Tq queries are the last Tq positions
    (Tq = Tk without a cache, Tq = 1 for a cached generation step).
    """
    Tk = attention_mask.size(1)
    k_pos = torch.arange(Tk, device=attention_mask.device)  # (Tk,)
    q_pos = k_pos[Tk - q_len:]  # (Tq,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)
    is_self = k_pos[None, :] == q_pos[:, None]  # (Tq, Tk)
    key_real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    # attending to itself keeps every softmax row non-empty, even at pad positions
    return causal & (key_real | is_self)  # (B, 1, Tq, Tk)


def at_positions(x: Tensor, at: Tensor) -> Tensor:
    """x (B, T, ...) -> (B, 1, ...): row b's entry at position at[b] (at (B,) long)."""
    return x[torch.arange(x.size(0), device=x.device), at][:, None]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Plain-matrix attention, softmax(QKᵀ/√hs + mask) V (Vaswani et al. 2017, eq. 1).

    q (B, nh, Tq, hs); k, v (B, nh, Tk, hs); mask (B, 1, Tq, Tk) bool. Returns
    (B, nh, Tq, hs). The naive reference beside `F.scaled_dot_product_attention`.
    """
    ### BEGIN SOLUTION
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))  # (B, nh, Tq, Tk), mask broadcast over heads
    return scores.softmax(dim=-1) @ v  # (B, nh, Tq, hs)
    ### END SOLUTION


# ---------------------------------------------------------------------------
# Transformer blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_head must divide n_embd"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_reference = False  # test hook: True computes `attention_reference` instead of SDPA

    def forward(self, x: Tensor, mask: Tensor, past_kv=None, at: Optional[Tensor] = None):
        """x (B, Tq, C); mask (B, 1, Tq, Tk); past_kv (k, v) each (B, nh, Tk - Tq, hs) or None.
        Returns y (B, Tq, C) and (k, v) each (B, nh, Tk, hs), the cache for the next step.

        at (B,) long: only row b's query at position at[b] (no cache), y is (B, 1, C). The keys
        and values still come from every position; the other queries would be wasted work."""
        B, Tq, C = x.shape
        hs = C // self.n_head
        if at is None:
            q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, Tq, C)
        else:
            w_q, w_kv = self.c_attn.weight.split([C, 2 * C])  # (C, C), (2C, C)
            b_q, b_kv = (None, None) if self.c_attn.bias is None else self.c_attn.bias.split([C, 2 * C])
            q = F.linear(at_positions(x, at), w_q, b_q)  # (B, 1, C)
            k, v = F.linear(x, w_kv, b_kv).split(C, dim=2)  # each (B, Tq, C)
            # the mask row of query at[b]: (B, Tq, 1, Tk) -> (B, 1, 1, Tk)
            mask = at_positions(mask.transpose(1, 2), at)
        q = q.view(B, q.size(1), self.n_head, hs).transpose(1, 2)  # (B, nh, Tq or 1, hs)
        k = k.view(B, Tq, self.n_head, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        v = v.view(B, Tq, self.n_head, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, Tk, hs)
            v = torch.cat([past_kv[1], v], dim=2)  # (B, nh, Tk, hs)
        if self.use_reference:
            y = attention_reference(q, k, v, mask)  # (B, nh, Tq, hs)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).contiguous().view(B, q.size(2), C)  # (B, Tq or 1, C), heads side by side
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor, past_kv=None, at: Optional[Tensor] = None):
        """x (B, Tq, C) -> (B, Tq, C) and the layer's (k, v); with `at` (B,), only row b's
        position at[b] is computed: (B, 1, C)."""
        a, kv = self.attn(self.ln_1(x), mask, past_kv, at)
        if at is not None:
            x = at_positions(x, at)  # (B, 1, C), the residual stream of the one query
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


# ---------------------------------------------------------------------------
# GPT


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
        raise ValueError("cannot sample: the next-token logits contain NaN or inf (has training diverged?)")
    u = (1 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]  # (B, 1), u > 0
    # A token of probability 0 adds nothing to the cdf, so an earlier index always reaches u first.
    return torch.searchsorted(cdf, u).squeeze(-1)  # (B,)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2 paper sec. 2.3: scale residual projections by 1/sqrt(N), N = 2 per block
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied token embedding counts once. With non_embedding the
        position embedding is left out (the convention of nanoGPT and Kaplan et al. 2020)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def _trunk(self, idx: Tensor, attention_mask: Optional[Tensor] = None, past_kvs=None,
               at: Optional[Tensor] = None):
        """idx (B, Tq) the new tokens; attention_mask (B, Tk) over cached + new tokens;
        past_kvs: per layer (k, v) each (B, nh, Tk - Tq, hs), or None for no cache.
        Returns hidden states (B, Tq, C) after ln_f and the per-layer (k, v) over all Tk.

        at (B,) long, without a cache: only row b's hidden state at position at[b], (B, 1, C).
        The last block then computes one query per row instead of T (the reward model reads
        one token: with 2 blocks, about a third fewer multiply-adds)."""
        if at is not None and past_kvs is not None:
            raise ValueError("`at` computes one position of a whole sequence: it takes no cache")
        B, Tq = idx.shape
        if attention_mask is None:
            Tp = 0 if past_kvs is None else past_kvs[0][0].size(2)
            attention_mask = torch.ones(B, Tp + Tq, dtype=torch.long, device=idx.device)
        Tk = attention_mask.size(1)
        if Tk > self.config.block_size:
            raise ValueError(f"sequence length {Tk} exceeds block_size {self.config.block_size}")
        pos = position_ids(attention_mask)[:, Tk - Tq:]  # (B, Tq)
        mask = build_attention_mask(attention_mask, Tq)  # (B, 1, Tq, Tk), shared by all layers
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, Tq, C)
        present = []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, kv = block(x, mask, None if past_kvs is None else past_kvs[i], at if last else None)
            present.append(kv)
        return self.ln_f(x), present

    def hidden_states(self, idx: Tensor, attention_mask: Optional[Tensor] = None,
                      at: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) long, attention_mask (B, T) 0/1 -> (B, T, C) after the final LayerNorm;
        with at (B,) long, only row b's state at position at[b]: (B, 1, C)."""
        return self._trunk(idx, attention_mask, at=at)[0]

    def forward(self, idx: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) long, attention_mask (B, T) 0/1 -> logits (B, T, V); logits[:, t]
        predict token t + 1. Outputs at pad positions are garbage: mask them."""
        return self.lm_head(self.hidden_states(idx, attention_mask))  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
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
        if T0 + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds block_size "
                f"{self.config.block_size}: shorten the prompts or generate fewer tokens")
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask.long()  # (B, T0)
        pad = 0 if eos_token_id is None else eos_token_id
        # The results, at full size: every row is pad (attention 0) after its EOS.
        out_tokens = F.pad(idx, (0, max_new_tokens), value=pad)  # (B, T0 + max_new_tokens)
        out_mask = F.pad(mask, (0, max_new_tokens), value=0)  # (B, T0 + max_new_tokens)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)  # (B,)
        out_logits = (torch.zeros(B, max_new_tokens, self.config.vocab_size, device=idx.device)
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
                h, past = self._trunk(tokens[:, -1:], live_mask, past)  # (b, 1, C)
            else:
                h, past = self._trunk(tokens, live_mask)  # (b, T, C)
            logits = self.lm_head(h[:, -1, :])  # (b, V), predicts the next token
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
# Scalar heads: reward model and value model


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) 0/1 -> (B,) long: the index of the last 1 in each row, whatever the padding
    (left, right or both). A row with no 1 gives 0."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device)  # (T,)
    return (positions * attention_mask.long()).argmax(dim=-1)  # (B,), the largest real position


class ScalarHeadModel(nn.Module):
    """A GPT trunk with a Linear(C, 1) head: one scalar per token.

    The reward model reads the scalar at the last real token (`score`, Ouyang et al. 2022);
    the value model uses every token's scalar (`forward`). Both start from the SFT model
    (`from_gpt`), as in Stiennon et al. 2020. The trunk keeps its (tied, parameter-free)
    lm_head, which is simply unused.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        # init of Stiennon et al. 2020 (lm-human-preferences): std 1/sqrt(d_model + 1), bias 0
        nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        # score = gain * raw + bias; the reward stage sets these so that rewards are
        # normalised (InstructGPT: mean 0 on the demonstrations). Saved in the state_dict.
        self.register_buffer("reward_gain", torch.tensor(1.0))
        self.register_buffer("reward_bias", torch.tensor(0.0))

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "ScalarHeadModel":
        """A new scalar-head model whose trunk is a deep copy of a trained GPT."""
        model = cls(copy.deepcopy(gpt.config))
        model.trunk = copy.deepcopy(gpt)
        return model

    def forward(self, idx: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) long, attention_mask (B, T) 0/1 -> raw per-token scalars (B, T)."""
        h = self.trunk.hidden_states(idx, attention_mask)  # (B, T, C)
        return self.head(h).squeeze(-1)  # (B, T)

    def score(self, idx: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """(B,) normalised reward: reward_gain * the scalar at the last real token + reward_bias.
        The same number as `forward(idx, attention_mask)` read at that token, but the last
        block only computes that token (`GPT.hidden_states(at=...)`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        last = last_token_index(attention_mask)  # (B,)
        h = self.trunk.hidden_states(idx, attention_mask, at=last)  # (B, 1, C)
        raw = self.head(h)[:, 0, 0]  # (B,)
        return self.reward_gain * raw + self.reward_bias
