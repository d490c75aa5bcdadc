"""Full attention against an einsum softmax in float64."""

import pytest
import torch

import attentions

from . import oracles


@pytest.mark.parametrize("size", [(7, 7), (9, 5), (1, 13)])
@pytest.mark.parametrize("options", [dict(), dict(side_dwconv=5, qkv_bias=False), dict(qk_scale=0.3)])
def test_matches_einsum_float64(size, options):
    module = attentions.create("full", dim=24, num_heads=3, **options).double()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    x = torch.randn(2, *size, 24, dtype=torch.float64)
    scale = options.get("qk_scale", (24 // 3) ** -0.5)
    torch.testing.assert_close(module(x), oracles.full_attention(module, x, scale), rtol=0, atol=1e-10)


def test_state_dict_names_match_biformer_last_stage():
    module = attentions.create("full", dim=64, num_heads=8, qkv_bias=False, side_dwconv=5)
    assert set(module.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias", "lepe.weight", "lepe.bias"}
