"""Tests of tmps.evaluate against an independent reference: the HF loss of each window."""

from __future__ import annotations

import math

import pytest
import torch

from tmps import evaluate

VOCAB = 97


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def make_tokenizer():
    """A fast tokenizer built offline: one id per character of a small alphabet."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = "abcdefghijklmnopqrstuvwxyz.,"
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("", behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def reference_perplexity(model, input_ids):
    """exp of the mean token NLL, from HF's own loss: mean over seq-1 targets per window."""
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss.double() for row in input_ids]
    # Every window predicts the same number of tokens (seq - 1), so the global token mean is
    # the plain mean of the per-window means.
    return math.exp(torch.stack(losses).mean().item())


@pytest.mark.parametrize("n, seq, batch_size", [(5, 16, 1), (5, 16, 2), (5, 16, 8), (3, 2, 3), (4, 33, 3)])
def test_perplexity_matches_hf_loss(model, n, seq, batch_size):
    ids = torch.randint(0, VOCAB, (n, seq))
    ppl = evaluate.perplexity(model, ids, batch_size=batch_size, progress=False)
    assert isinstance(ppl, float)
    assert ppl == pytest.approx(reference_perplexity(model, ids), rel=1e-5)


def test_perplexity_weights_every_token_equally(model):
    ids = torch.randint(0, VOCAB, (6, 12))
    nll = torch.cat([evaluate.window_nll(model, ids[i:i + 1]) for i in range(6)])
    expected = math.exp(nll.sum().item() / (6 * 11))
    assert evaluate.perplexity(model, ids, batch_size=4, progress=False) == pytest.approx(expected, rel=1e-6)
    # Two halves combine as a token-weighted geometric mean.
    a = evaluate.perplexity(model, ids[:2], progress=False)
    b = evaluate.perplexity(model, ids[2:], progress=False)
    combined = math.exp((2 * math.log(a) + 4 * math.log(b)) / 6)
    assert evaluate.perplexity(model, ids, progress=False) == pytest.approx(combined, rel=1e-6)


def test_windows_are_scored_independently(model):
    """No context leaks between windows: a window's NLL does not depend on its batch mates."""
    ids = torch.randint(0, VOCAB, (4, 10))
    alone = torch.cat([evaluate.window_nll(model, ids[i:i + 1]) for i in range(4)])
    together = evaluate.window_nll(model, ids)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    shuffled = evaluate.window_nll(model, ids[[2, 0, 3, 1]])
    torch.testing.assert_close(shuffled, alone[[2, 0, 3, 1]], rtol=1e-5, atol=1e-5)


def test_perfect_model_has_perplexity_one():
    class Oracle(torch.nn.Module):
        """Puts all mass on the next token of a fixed sequence."""

        def __init__(self, ids):
            super().__init__()
            self.ids = ids
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, **kwargs):
            logits = torch.full((*input_ids.shape, VOCAB), -1e4)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1e4)
            return type("Out", (), {"logits": logits})()

    ids = torch.randint(0, VOCAB, (3, 9))
    assert evaluate.perplexity(Oracle(ids), ids, progress=False) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [
    torch.zeros((0, 8), dtype=torch.long),   # empty
    torch.zeros(8, dtype=torch.long),        # 1-D
    torch.zeros((3, 1), dtype=torch.long),   # seq < 2
    torch.zeros((2, 0), dtype=torch.long),   # seq = 0
    torch.zeros((2, 8)),                     # float
    torch.zeros((1, 2, 8), dtype=torch.long),
    [[1, 2, 3]],                              # not a tensor
])
def test_perplexity_rejects_bad_input_ids(model, bad):
    with pytest.raises(ValueError, match="expected"):
        evaluate.perplexity(model, bad, progress=False)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_perplexity_rejects_bad_batch_size(model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate.perplexity(model, torch.zeros((2, 4), dtype=torch.long), batch_size=batch_size)


def test_progress_bar_can_be_disabled(model, capsys):
    ids = torch.randint(0, VOCAB, (2, 8))
    evaluate.perplexity(model, ids, progress=False)
    assert capsys.readouterr().err == ""
    evaluate.perplexity(model, ids, progress=True)
    assert "perplexity" in capsys.readouterr().err


def test_perplexity_restores_grad_mode(model):
    evaluate.perplexity(model, torch.randint(0, VOCAB, (1, 4)), progress=False)
    assert torch.is_grad_enabled()


def test_tokens_per_second(model):
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, use_cache=None, logits_to_keep=0):
            seen.append((tuple(input_ids.shape), use_cache, logits_to_keep))
            return self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)

    ids = torch.randint(0, VOCAB, (5, 16))
    tps = evaluate.tokens_per_second(Spy(), ids, batch_size=2, n_repeats=3, n_warmup=1)
    assert isinstance(tps, float) and tps > 0
    assert len(seen) == 4 * 3  # (1 warm-up + 3 timed) passes of 3 batches
    assert {s[0] for s in seen} == {(2, 16), (1, 16)}
    assert all(use_cache is False and keep == 1 for _, use_cache, keep in seen)
    assert evaluate.tokens_per_second(model, ids, n_repeats=1, n_warmup=0, logits_to_keep=None) > 0


@pytest.mark.parametrize("kwargs", [dict(n_repeats=0), dict(n_warmup=-1), dict(batch_size=0)])
def test_tokens_per_second_rejects_bad_arguments(model, kwargs):
    with pytest.raises(ValueError, match="expected"):
        evaluate.tokens_per_second(model, torch.zeros((2, 4), dtype=torch.long), **kwargs)


def test_perplexity_of_text(model):
    from tmps.assets import token_windows

    tok = make_tokenizer()
    text = "the state of the union is strong. we will work, and america will lead. " * 4
    ids = token_windows(tok, text, 16, None)
    expected = evaluate.perplexity(model, ids, progress=False)
    assert evaluate.perplexity_of_text(model, tok, text, seq_len=16, progress=False) == pytest.approx(expected)
    # More windows asked for than fit: all that fit.
    assert evaluate.perplexity_of_text(model, tok, text, seq_len=16, max_windows=10_000,
                                       progress=False) == pytest.approx(expected)
    first_two = evaluate.perplexity(model, ids[:2], progress=False)
    assert evaluate.perplexity_of_text(model, tok, text, seq_len=16, max_windows=2,
                                       progress=False) == pytest.approx(first_two)


def test_perplexity_of_text_too_short(model):
    with pytest.raises(ValueError, match="tokens"):
        evaluate.perplexity_of_text(model, make_tokenizer(), "abc", seq_len=16, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        evaluate.perplexity_of_text(model, make_tokenizer(), "abc", seq_len=1, progress=False)
