"""Tests for minirlhf.model: the tiny GPT, its padding rules, KV-cache generation, and the
scalar-head (reward / value) models.

What is checked:
  - hand examples: position ids, the attention mask, `last_token_index`;
  - references: SDPA equals the plain-matrix attention (with padding); cached generation
    equals full recomputation (same greedy tokens, same logits at every step);
  - padding invariance: the logits of real tokens do not depend on left padding (0, 1, 5
    pads), right padding, or both at once (generated sequences after EOS); a left-padded
    batch generates what each prompt generates alone; `score` reads the last real token;
  - generation semantics after EOS (masks, padding, `finished`, early stop), sampling
    reproducibility, the block_size guard;
  - initialisation: GPT-2 init, tied embeddings, the scalar head's init and buffers,
    `from_gpt` copying the trunk independently.

Models are tiny and their weights are re-drawn with a large std, so that outputs depend
strongly on the context and a padding bug cannot hide in near-uniform predictions.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf.model import (GPT, CausalSelfAttention, GPTConfig, ScalarHeadModel, at_positions, attention_reference,
                            build_attention_mask, hidden_state_at, hidden_state_at_reference, last_token_index,
                            position_ids)
from minirlhf.sampling import sample_next_token

V = 50
EOS = 1
PAD_FILL = 7  # any token id works as padding content; tests use several to show it


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32), **overrides})


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # sharper than GPT-2 init: context matters a lot
    return model


def tiny_scalar_model(seed: int = 0) -> ScalarHeadModel:
    model = ScalarHeadModel.from_gpt(tiny_gpt(seed)).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.5)  # a nonzero bias, so "which token is read" is the only variable
    return model


def left_pad(rows, fill=PAD_FILL):
    """Lists of token ids -> left-padded idx (B, T) and attention_mask (B, T)."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), fill, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return idx, mask


def force_eos_bias(model: GPT, eos_logit: float) -> GPT:
    """Give the output layer a bias that adds eos_logit to EOS (and nothing elsewhere)."""
    head = nn.Linear(model.config.n_embd, V, bias=True)
    head.weight = model.wte.weight  # keep the tie
    with torch.no_grad():
        head.bias.zero_()
        head.bias[EOS] = eos_logit
    model.lm_head = head
    return model


# ---------------------------------------------------------------------------
# Hand examples


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 1, 1]])
    assert torch.equal(position_ids(mask), expected)


def test_attention_mask_is_causal_and_key_real_plus_self():
    mask = build_attention_mask(torch.tensor([[0, 1, 1]]), q_len=3)
    expected = torch.tensor([[1, 0, 0],   # the pad query sees only itself
                             [0, 1, 0],   # the pad key is hidden from real queries
                             [0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 3, 3)
    assert torch.equal(mask[0, 0], expected)
    # a cached step: one query (the last position) against all keys
    step = build_attention_mask(torch.tensor([[0, 1, 1, 0]]), q_len=1)
    assert torch.equal(step[0, 0], torch.tensor([[0, 1, 1, 1]], dtype=torch.bool))


def test_last_token_index_hand_examples():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding
                         [0, 0, 1, 1, 1],    # left padding
                         [0, 1, 1, 0, 0],    # both
                         [1, 1, 1, 1, 1],    # none
                         [0, 0, 1, 0, 0]])   # a single real token
    assert torch.equal(last_token_index(mask), torch.tensor([2, 4, 2, 4, 2]))
    assert last_token_index(mask.bool()).dtype == torch.long
    assert torch.equal(last_token_index(mask.float()), torch.tensor([2, 4, 2, 4, 2]))


# ---------------------------------------------------------------------------
# References: SDPA vs plain matrices, cache vs recomputation


def test_at_positions_hand_example():
    x = torch.arange(12).view(2, 3, 2)  # (B=2, T=3, 2)
    assert at_positions(x, torch.tensor([2, 0])).tolist() == [[[4, 5]], [[6, 7]]]  # (B, 1, 2)


def test_sdpa_equals_reference_attention_with_padding_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))  # (B, nh, T, hs)
    mask = build_attention_mask(torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]), 6)
    fast = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    slow = attention_reference(q, k, v, mask)
    assert not torch.isnan(fast).any() and not torch.isnan(slow).any()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_model_with_reference_attention_gives_same_logits():
    model = tiny_gpt()
    idx, mask = left_pad([[3, 4, 5, 6, 8], [9, 10], [11, 12, 13]])
    fast = model(idx, mask)
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.use_reference = True
    slow = model(idx, mask)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fast, model(idx))  # the mask matters, so the check above means something


def test_cached_and_uncached_greedy_generation_agree():
    model = tiny_gpt()
    idx, mask = left_pad([[3, 4, 5, 6, 8], [9, 10], [11, 12, 13, 14]])
    kw = dict(max_new_tokens=20, temperature=0.0, return_logits=True)
    cached = model.generate(idx, mask, use_cache=True, **kw)
    full = model.generate(idx, mask, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.logits.shape == (3, 20, V)
    torch.testing.assert_close(cached.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert len(set(cached.tokens[0, 5:].tolist())) > 2  # the model is not stuck on one token


def test_cached_and_uncached_sampling_agree_with_eos():
    model = force_eos_bias(tiny_gpt(1), eos_logit=2.0)
    idx, mask = left_pad([[3, 4, 5], [9], [11, 12]] * 3)
    runs = [model.generate(idx, mask, max_new_tokens=12, eos_token_id=EOS, use_cache=c,
                           generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    for field in ("tokens", "attention_mask", "response_mask", "finished"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), f"{field}"


# ---------------------------------------------------------------------------
# Padding invariance


@pytest.mark.parametrize("n_pad", [0, 1, 5])
def test_logits_do_not_change_with_left_padding(n_pad):
    model = tiny_gpt()
    row = torch.tensor([[3, 4, 5, 6, 8, 9]])
    alone = model(row)  # (1, 6, V)
    other = torch.tensor([[20, 21, 22, 23, 24, 25] + [26] * n_pad])  # an unpadded neighbour row
    idx = torch.cat([torch.cat([torch.randint(0, V, (1, n_pad)), row], dim=1), other])  # (2, 6 + n_pad)
    mask = torch.ones_like(idx)
    mask[0, :n_pad] = 0
    padded = model(idx, mask)
    torch.testing.assert_close(padded[0, n_pad:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], model(other)[0], atol=1e-5, rtol=1e-5)


def test_logits_do_not_change_with_right_padding():
    model = tiny_gpt()
    row = torch.tensor([[3, 4, 5, 6]])
    idx = torch.cat([row, torch.randint(0, V, (1, 4))], dim=1)  # (1, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    torch.testing.assert_close(model(idx, mask)[0, :4], model(row)[0], atol=1e-5, rtol=1e-5)


def test_mixed_padding_in_generated_sequences():
    """Left-padded prompts + right padding after EOS: every row's real logits equal the
    logits of its real tokens alone."""
    model = force_eos_bias(tiny_gpt(2), eos_logit=2.5)
    idx, mask = left_pad([[3, 4, 5, 6], [9], [11, 12], [13, 14, 15]] * 2)
    gen = model.generate(idx, mask, max_new_tokens=12, eos_token_id=EOS, generator=torch.Generator().manual_seed(3))
    assert gen.finished.any() and not gen.finished.all()  # both kinds of row are covered
    logits = model(gen.tokens, gen.attention_mask)
    for i in range(len(idx)):
        real = gen.attention_mask[i].bool()
        alone = model(gen.tokens[i][real][None])[0]
        torch.testing.assert_close(logits[i][real], alone, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_gpt()
    prompts = [[3, 4, 5, 6, 8], [9, 10], [11, 12, 13]]
    idx, mask = left_pad(prompts)
    batch = model.generate(idx, mask, max_new_tokens=10, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10, temperature=0.0)
        assert torch.equal(batch.tokens[i, -10:], alone.tokens[0, -10:]), f"prompt {i}"


def test_score_reads_the_last_real_token_whatever_the_padding():
    model = tiny_scalar_model()
    with torch.no_grad():
        model.reward_gain.fill_(2.0)
        model.reward_bias.fill_(-0.25)
    row = [3, 4, 5, 6]
    unpadded = model(torch.tensor([row]))[0, -1]  # raw scalar at the last token
    idx = torch.tensor([[7, 7] + row,          # left
                        row + [7, 7],          # right
                        [7] + row + [7]])      # mixed
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    values = model(idx, mask)  # (3, 6)
    scores = model.score(idx, mask)  # (3,)
    last = torch.tensor([5, 3, 4])
    torch.testing.assert_close(scores, 2.0 * values[torch.arange(3), last] - 0.25)
    torch.testing.assert_close(scores, (2.0 * unpadded - 0.25).expand(3), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(values[1, -1], unpadded)  # reading the final column would be wrong


@pytest.mark.parametrize("bias", [True, False])
def test_one_position_of_the_hidden_states_equals_the_full_pass_values_and_gradients(bias):
    """The speed-up `hidden_state_at` against its plain twin, with padding on either side and with
    and without biases: the same values and the same parameter gradients."""
    torch.manual_seed(0)
    model = GPT(tiny_config(bias=bias))
    idx = torch.randint(0, model.config.vocab_size, (4, 7))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]])
    at = torch.tensor([6, 3, 0, 5])  # any real position, not only the last
    probe = torch.randn(4, model.config.n_embd) / 10  # a loss = <probe, h>, with unit-scale gradients
    full = model.hidden_states(idx, mask)[torch.arange(4), at]  # (4, C), every position computed
    (probe * full).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    one = hidden_state_at(model, idx, mask, at)  # (4, 1, C), the last block for one query per row
    (probe * one[:, 0]).sum().backward()
    assert one.shape == (4, 1, model.config.n_embd)
    torch.testing.assert_close(one[:, 0], full)
    torch.testing.assert_close(hidden_state_at_reference(model, idx, mask, at)[:, 0], full)   # the plain twin
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------
# Generation semantics


def test_eos_masks_padding_and_finished_flags():
    model = force_eos_bias(tiny_gpt(1), eos_logit=2.0)
    T0, N = 3, 12
    idx, mask = left_pad([[3, 4, 5], [9], [11, 12]] * 6)
    gen = model.generate(idx, mask, max_new_tokens=N, eos_token_id=EOS, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == gen.attention_mask.shape == gen.response_mask.shape == (len(idx), T0 + N)
    assert torch.equal(gen.tokens[:, :T0], idx) and torch.equal(gen.attention_mask[:, :T0], mask)
    stops = set()
    for i in range(len(idx)):
        response = gen.tokens[i, T0:].tolist()
        n_real = response.index(EOS) + 1 if EOS in response else N  # up to and including EOS
        stops.add(n_real)
        assert bool(gen.finished[i]) == (EOS in response)
        assert gen.response_mask[i, T0:].tolist() == [1] * n_real + [0] * (N - n_real)
        assert torch.equal(gen.attention_mask[i, T0:], gen.response_mask[i, T0:])
        assert response[n_real:] == [EOS] * (N - n_real)  # padding after EOS is eos_token_id
    assert gen.response_mask[:, :T0].sum() == 0
    assert len(stops) > 3 and N in stops  # rows stop at different times, and some never stop


@pytest.mark.parametrize("use_cache, drop_finished", [(True, True), (False, True), (True, False)])
def test_rows_leaving_the_batch_after_eos_change_no_other_row(use_cache, drop_finished):
    # generate drops finished rows from its working batch; greedy decoding makes each row's
    # result independent of the others, so the batch must reproduce each row run alone
    model = force_eos_bias(tiny_gpt(2), eos_logit=2.5)
    prompts = [[3, 4, 5], [9], [11, 12], [20, 21, 22, 23], [30], [31, 32], [40, 41], [6], [44, 45, 46]]
    idx, mask = left_pad(prompts)
    N = 14
    kw = dict(max_new_tokens=N, temperature=0.0, eos_token_id=EOS, return_logits=True, use_cache=use_cache,
              drop_finished=drop_finished)
    batch = model.generate(idx, mask, **kw)
    lengths = batch.response_mask.sum(-1).tolist()
    assert len(set(lengths)) >= 3 and min(lengths) * 2 <= max(lengths)   # rows leave at different steps
    for i, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **kw)
        T0 = idx.size(1) - len(prompt)                      # row i's left padding in the batch
        assert batch.tokens[i, T0 + len(prompt):].tolist() == alone.tokens[0, len(prompt):].tolist()
        assert batch.response_mask[i, idx.size(1):].tolist() == alone.response_mask[0, len(prompt):].tolist()
        assert bool(batch.finished[i]) == bool(alone.finished[0])
        n = lengths[i]                                      # logits are real while the row is
        torch.testing.assert_close(batch.logits[i, :n], alone.logits[0, :n], atol=1e-5, rtol=1e-5)


def test_generation_stops_early_when_every_row_emits_eos():
    model = force_eos_bias(tiny_gpt(), eos_logit=100.0)
    idx, mask = left_pad([[3, 4, 5], [9]])
    gen = model.generate(idx, mask, max_new_tokens=6, eos_token_id=EOS, return_logits=True)
    assert gen.finished.all()
    assert gen.logits.shape[1] == 1  # one step ran
    assert gen.tokens.shape == (2, 9) and (gen.tokens[:, 3:] == EOS).all()  # padded to T0 + N
    assert gen.response_mask.tolist() == [[0, 0, 0, 1, 0, 0, 0, 0, 0]] * 2
    assert gen.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0]]


def test_no_eos_means_all_sampled_tokens_are_real():
    model = force_eos_bias(tiny_gpt(), eos_logit=-100.0)
    gen = model.generate(torch.tensor([[3, 4]]), max_new_tokens=5, eos_token_id=EOS,
                         generator=torch.Generator().manual_seed(0))
    assert not gen.finished.any()
    assert gen.response_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1]]
    assert gen.attention_mask.tolist() == [[1] * 7]


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_gpt()
    idx = torch.tensor([[3, 4, 5], [6, 7, 8]])

    def sample(seed, **kw):
        return model.generate(idx, max_new_tokens=10, generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0, temperature=2.0), sample(1, temperature=2.0))
    greedy = model.generate(idx, max_new_tokens=10, temperature=0.0).tokens
    assert torch.equal(sample(5, top_k=1), greedy)


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampled_tokens_follow_the_softmax_and_top_k_never_draws_the_rest(top_k):
    logits = torch.tensor([-50.0, 1.0, 0.0, 2.0, -1.0, -50.0, 0.5])  # tokens 0 and 5: probability ~0
    n = 200_000
    tokens = sample_next_token(logits.expand(n, -1), 1.0, top_k, torch.Generator().manual_seed(0))  # (n,)
    freq = torch.bincount(tokens, minlength=len(logits)) / n  # (V,)
    kept = logits if top_k is None else logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    expected = kept.softmax(dim=-1)  # (V,)
    # 5 standard errors of a frequency of n draws, at most sqrt(0.25 / n) = 0.0011
    torch.testing.assert_close(freq, expected, atol=5 * (0.25 / n) ** 0.5, rtol=0)
    assert freq[0] == freq[5] == 0
    if top_k is not None:
        assert set(tokens.unique().tolist()) == {1, 3, 6}


def test_sampling_refuses_nan_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        sample_next_token(logits, 1.0, None, torch.Generator().manual_seed(0))


def test_generate_refuses_to_run_past_block_size():
    model = tiny_gpt()  # block_size 32
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=3)
    model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=2)  # exactly fits


# ---------------------------------------------------------------------------
# Initialisation, tying, scalar heads


def test_gpt2_init_and_tied_embeddings():
    torch.manual_seed(0)
    config = tiny_config(n_layer=4, n_embd=64, n_head=4)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in set(model.parameters()))
    assert model.num_params() == model.num_params(non_embedding=False) - config.block_size * config.n_embd
    assert math.isclose(model.blocks[0].attn.c_attn.weight.std().item(), 0.02, rel_tol=0.1)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.blocks:
        assert math.isclose(block.attn.c_proj.weight.std().item(), residual_std, rel_tol=0.1)
        assert math.isclose(block.mlp.c_proj.weight.std().item(), residual_std, rel_tol=0.1)
    assert model.blocks[0].mlp.c_fc.bias.abs().sum() == 0
    assert GPTConfig().dropout == 0.0


def test_scalar_head_init_and_reward_buffers():
    torch.manual_seed(0)
    n_embd = 512
    model = ScalarHeadModel(tiny_config(n_layer=1, n_embd=n_embd, n_head=4))
    assert math.isclose(model.head.weight.std().item(), 1 / math.sqrt(n_embd + 1), rel_tol=0.12)
    assert model.head.bias.item() == 0.0
    state = model.state_dict()
    assert state["reward_gain"].item() == 1.0 and state["reward_bias"].item() == 0.0


def test_from_gpt_copies_the_trunk_and_the_copy_is_independent():
    gpt = tiny_gpt()
    model = ScalarHeadModel.from_gpt(gpt)
    idx, mask = left_pad([[3, 4, 5], [9]])
    torch.testing.assert_close(model.trunk.hidden_states(idx, mask), gpt.hidden_states(idx, mask))
    for (name, p), q in zip(gpt.named_parameters(), model.trunk.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), f"{name}"
    with torch.no_grad():
        gpt.wte.weight.add_(1.0)
    assert not torch.equal(gpt.wte.weight, model.trunk.wte.weight)
    assert model.trunk.lm_head.weight is model.trunk.wte.weight  # the tie survives the copy
