"""tmps.compat.cache_keyword names the forward's cache argument of the installed transformers."""
import inspect

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tmps.compat import cache_keyword


class OldStyle(nn.Module):  # a forward as transformers 5.17 spells it
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return past_key_values


class NewStyle(nn.Module):  # a forward as transformers 5.24 spells it
    def forward(self, input_ids, cache=None, use_cache=None):
        return cache


def test_names_each_spelling():
    assert cache_keyword(OldStyle()) == "past_key_values"
    assert cache_keyword(NewStyle()) == "cache"


def test_asks_the_model_a_compile_wrapper_wraps():
    compiled = torch.compile(OldStyle(), backend="eager")  # its own forward takes *args, **kwargs
    assert cache_keyword(compiled) == "past_key_values"


def test_the_installed_transformers_takes_the_name_it_gives():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert cache_keyword(model) in inspect.signature(type(model).forward).parameters
