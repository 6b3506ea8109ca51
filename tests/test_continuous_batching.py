"""transformers' continuous batching (``model.generate_batch``, a paged KV cache) on compressed models.

Weights mode keeps the dense model's cache, so it serves there: at full rank it gives the dense
model's tokens and log-probabilities. kv mode caches latents, which the paged cache cannot hold: the
request fails with an error that says so and what to use instead. Before, both modes failed with a
TypeError from the paged cache's ``update`` (transformers 5.17 hands the attention function its
paged cache as ``cache``, which tmps took for the layer's own; 5.25 passes the batch's indices to
``update``), and ``generate_batch`` returned empty generations.
"""
import copy
import inspect
import logging

import pytest
import torch
from transformers import GenerationConfig

import tmps

from test_compress import calib
from test_pretrained import BUILDERS

# HF's continuous batching does not serve OPT (its learned positions): the dense model's requests fail too.
SERVED = [arch for arch in BUILDERS if arch != "opt"]
PROMPTS = [[1, 2, 3, 4, 5], [5, 6, 7]]


def generate_batch(model):
    """``{request: (tokens, log-probabilities)}`` of 4 greedy tokens per prompt, and the requests' errors.

    A small paged cache and no warm-up: the defaults size the cache by the machine's memory and take
    ~10 s a call on a CPU."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    paging = ContinuousBatchingConfig(**{page: 16}, num_blocks=16, max_batch_tokens=64, return_logprobs=True)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(inputs=PROMPTS, generation_config=config, continuous_batching_config=paging,
                               warmup=False, progress_bar=False)
    return ({name: (o.generated_tokens, o.logprobs) for name, o in out.items()},
            [o.error for o in out.values() if o.error])


@pytest.mark.parametrize("arch", SERVED)
def test_weights_mode_serves_continuous_batching_as_dense(arch):
    dense = BUILDERS[arch]()
    want, errors = generate_batch(dense)
    assert not errors and all(tokens for tokens, _ in want.values()), (errors, want)
    model = tmps.compress(copy.deepcopy(dense), calib(), mode="weights", hooi_ranks=[dense.config.hidden_size],
                          progress=False)
    got, errors = generate_batch(model)
    assert not errors, errors
    assert {name: tokens for name, (tokens, _) in got.items()} == {name: tokens for name, (tokens, _) in want.items()}
    for name, (_, logprobs) in got.items():
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want[name][1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_mode_refuses_continuous_batching_by_name(arch, caplog):
    model = tmps.compress(BUILDERS[arch](), calib(), mode="kv", ratio=0.5, progress=False)
    with caplog.at_level(logging.ERROR):
        out, errors = generate_batch(model)
    assert errors and all("kv mode caches latent keys and values" in e and "mode='weights'" in e for e in errors), \
        (errors, caplog.text)
    assert not any(tokens for tokens, _ in out.values())
