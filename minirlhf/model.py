"""A tiny GPT and the scalar-head models (reward and value); its sampler is in sampling.py.

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

Speed-up, confined to the end of the file: the reward model reads one token per row, so its
last block computes that one query (`hidden_state_at`, beside its plain twin
`hidden_state_at_reference`; tests/test_model.py checks they agree).

Deliberate simplification: the reference attention applies no attention dropout (it exists
to check SDPA).
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minirlhf.sampling import Generation, generate_tokens


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

    def forward(self, x: Tensor, mask: Tensor, past_kv=None):
        """x (B, Tq, C); mask (B, 1, Tq, Tk); past_kv (k, v) each (B, nh, Tk - Tq, hs) or None.
        Returns y (B, Tq, C) and (k, v) each (B, nh, Tk, hs), the cache for the next step."""
        B, Tq, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, Tq, C)
        k, v = self.heads(k), self.heads(v)  # each (B, nh, Tq, hs)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, Tk, hs)
            v = torch.cat([past_kv[1], v], dim=2)  # (B, nh, Tk, hs)
        return self.attend(self.heads(q), k, v, mask), (k, v)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, nh, T, hs): the heads side by side become a dimension of their own."""
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (B, nh, Tq, hs), k and v (B, nh, Tk, hs), mask (B, 1, Tq, Tk) -> (B, Tq, C) after the
        output projection."""
        if self.use_reference:
            y = attention_reference(q, k, v, mask)  # (B, nh, Tq, hs)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Tq, hs)
        B, nh, Tq, hs = y.shape
        y = y.transpose(1, 2).contiguous().view(B, Tq, nh * hs)  # (B, Tq, C), heads side by side
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x: Tensor, mask: Tensor, past_kv=None):
        """x (B, Tq, C) -> (B, Tq, C) and the layer's (k, v)."""
        a, kv = self.attn(self.ln_1(x), mask, past_kv)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


# ---------------------------------------------------------------------------
# GPT


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

    def embed(self, idx: Tensor, attention_mask: Optional[Tensor] = None, past_kvs=None):
        """The blocks' input: token + position embeddings (B, Tq, C) of the new tokens idx (B, Tq),
        and the attention mask (B, 1, Tq, Tk) that every block shares; attention_mask (B, Tk)
        covers cached + new tokens (None: all real)."""
        B, Tq = idx.shape
        if attention_mask is None:
            Tp = 0 if past_kvs is None else past_kvs[0][0].size(2)
            attention_mask = torch.ones(B, Tp + Tq, dtype=torch.long, device=idx.device)
        Tk = attention_mask.size(1)
        if Tk > self.config.block_size:
            raise ValueError(f"sequence length {Tk} exceeds block_size {self.config.block_size}")
        pos = position_ids(attention_mask)[:, Tk - Tq:]  # (B, Tq)
        mask = build_attention_mask(attention_mask, Tq)  # (B, 1, Tq, Tk), shared by all layers
        return self.drop(self.wte(idx) + self.wpe(pos)), mask  # (B, Tq, C), (B, 1, Tq, Tk)

    def _trunk(self, idx: Tensor, attention_mask: Optional[Tensor] = None, past_kvs=None):
        """idx (B, Tq) the new tokens; attention_mask (B, Tk) over cached + new tokens;
        past_kvs: per layer (k, v) each (B, nh, Tk - Tq, hs), or None for no cache.
        Returns hidden states (B, Tq, C) after ln_f and the per-layer (k, v) over all Tk."""
        x, mask = self.embed(idx, attention_mask, past_kvs)  # (B, Tq, C), (B, 1, Tq, Tk)
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if past_kvs is None else past_kvs[i])
            present.append(kv)
        return self.ln_f(x), present

    def hidden_states(self, idx: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) long, attention_mask (B, T) 0/1 -> (B, T, C) after the final LayerNorm."""
        return self._trunk(idx, attention_mask)[0]

    def forward(self, idx: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) long, attention_mask (B, T) 0/1 -> logits (B, T, V); logits[:, t]
        predict token t + 1. Outputs at pad positions are garbage: mask them."""
        return self.lm_head(self.hidden_states(idx, attention_mask))  # (B, T, V)

    def generate(self, idx: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> "Generation":
        """Sample after each prompt of a left-padded batch with the KV cache: the loop is
        `minirlhf.sampling.generate_tokens(self, idx, attention_mask, ...)`, which documents the arguments."""
        return generate_tokens(self, idx, attention_mask, **kwargs)


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
        block only computes that token (`hidden_state_at`, below)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        last = last_token_index(attention_mask)  # (B,)
        h = hidden_state_at(self.trunk, idx, attention_mask, last)  # (B, 1, C)
        raw = self.head(h)[:, 0, 0]  # (B,)
        return self.reward_gain * raw + self.reward_bias


# ---------------------------------------------------------------------------
# Speed-up: the hidden state at one position per row
#
# The reward model reads one token per row. Every block but the last must still run on all
# positions (the keys and values of the last block come from them), but the last block needs
# only that one query: with 2 blocks, about a third fewer multiply-adds and a step of reward
# training 100 ms instead of 143 ms (benchmarks/bench_preferences.py).


def at_positions(x: Tensor, at: Tensor) -> Tensor:
    """x (B, T, ...) -> (B, 1, ...): row b's entry at position at[b] (at (B,) long)."""
    return x[torch.arange(x.size(0), device=x.device), at][:, None]


def hidden_state_at_reference(gpt: GPT, idx: Tensor, attention_mask: Tensor, at: Tensor) -> Tensor:
    """(B, 1, C): row b's final hidden state at position at[b], from the full pass (the plain twin)."""
    return at_positions(gpt.hidden_states(idx, attention_mask), at)


def hidden_state_at(gpt: GPT, idx: Tensor, attention_mask: Tensor, at: Tensor) -> Tensor:
    """The same (B, 1, C) as `hidden_state_at_reference`, with the last block run for one query per row."""
    x, mask = gpt.embed(idx, attention_mask)  # (B, T, C), (B, 1, T, T)
    for block in gpt.blocks[:-1]:
        x, _ = block(x, mask)
    block, attn = gpt.blocks[-1], gpt.blocks[-1].attn
    h = block.ln_1(x)  # (B, T, C)
    C = h.size(-1)
    w_q, w_kv = attn.c_attn.weight.split([C, 2 * C])  # (C, C), (2C, C): c_attn's query rows, key and value rows
    b_q, b_kv = (None, None) if attn.c_attn.bias is None else attn.c_attn.bias.split([C, 2 * C])
    q = F.linear(at_positions(h, at), w_q, b_q)  # (B, 1, C), the one query
    k, v = F.linear(h, w_kv, b_kv).split(C, dim=2)  # each (B, T, C), from every position
    mask = at_positions(mask.transpose(1, 2), at)  # (B, T, 1, T) -> (B, 1, 1, T), the query's mask row
    x = at_positions(x, at) + attn.attend(attn.heads(q), attn.heads(k), attn.heads(v), mask)  # (B, 1, C)
    return gpt.ln_f(x + block.mlp(block.ln_2(x)))  # (B, 1, C)
