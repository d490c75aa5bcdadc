"""Models: official checkpoints load strictly and give the official outputs; published sizes; timm
registration; every mechanism trains inside the STL backbone."""

from pathlib import Path

import pytest
import timm
import torch

import attentions
import attentions.by_image
from attnbench.measure.flops import count_flops
from attnbench.models import load_checkpoint
from attnbench.models.biformer import BiFormer
from attnbench.models.biformer_stl import ABLATION_ATTENTION, ARCHITECTURE_PATH, BiFormerSTL
from attnbench.models.checkpoint import CheckpointError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=16, num_classes=10)


@pytest.mark.parametrize("model_cls,fixture,options", [
    (BiFormer, "official_biformer_small.pth", dict(mlp_ratios=(3, 3, 3, 3))),
    (BiFormerSTL, "official_stl_small.pth", dict(mlp_ratios=(4, 4, 4, 4))),
])
def test_official_checkpoint_loads_strictly_and_gives_the_official_output(model_cls, fixture, options):
    model = load_checkpoint(model_cls(**SMALL, **options), FIXTURES / fixture).eval()
    reference = torch.load(FIXTURES / fixture, weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(reference["input"]), reference["output"], rtol=1e-4, atol=1e-5)


def test_load_checkpoint_says_what_does_not_fit(tmp_path):
    model = BiFormer(**{**SMALL, "num_classes": 7})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(2\): head.bias \(10,\) vs model \(7,\)"):
        load_checkpoint(model, FIXTURES / "official_biformer_small.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): .*unexpected keys \(\d+\): downsample_layers"):
        load_checkpoint(BiFormerSTL(**SMALL), FIXTURES / "official_biformer_small.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a torch checkpoint"):
        load_checkpoint(model, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(model, tmp_path / "absent.pth")


# paper (official README): params M, GMACs at 224²; we must be within 1%
PUBLISHED = {"biformer_tiny": (13.1, 2.2), "biformer_small": (25.5, 4.5), "biformer_base": (56.8, 9.8),
             "biformer_stl": (28.4, 4.6)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameters_match_the_published_figures(name):
    params = sum(p.numel() for p in timm.create_model(name).parameters()) / 1e6
    assert params == pytest.approx(PUBLISHED[name][0], rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_macs_match_the_published_figures(name):
    """The official code's computation (impl="reference"); the dense backend also spends masked MACs."""
    model = timm.create_model(name, impl="reference").eval()
    with torch.no_grad():
        macs = count_flops(lambda: model(torch.randn(1, 3, 224, 224))).macs / 1e9
    assert macs == pytest.approx(PUBLISHED[name][1], rel=0.01)


def test_timm_create_model_and_feature_pyramid():
    model = timm.create_model("biformer_tiny", num_classes=5, drop_path_rate=0.1).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 5)
        assert model.forward_features(x).shape == (1, 512, 7, 7)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[1:] for m in maps] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    features = timm.create_model("biformer_stl", features_only=True).eval()
    with torch.no_grad():
        assert [f.shape[1:] for f in features(x)] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    assert features.feature_info.channels() == [96, 192, 384, 768]
    assert features.feature_info.reduction() == [4, 8, 16, 32]


def test_architecture_path_ends_at_biformer_small():
    for name in ARCHITECTURE_PATH:
        assert isinstance(timm.create_model(name), BiFormerSTL)
    last = sum(p.numel() for p in timm.create_model("biformer_stl_deeper_cpe").parameters())
    assert last == sum(p.numel() for p in timm.create_model("biformer_small").parameters())


def test_every_built_in_mechanism_has_an_ablation_configuration():
    """Every mechanism of the ``attentions`` package (not test or plug-in registrations) has an STL row."""
    built_in = {name for name in attentions.available() if attentions.get(name).__module__.startswith("attentions.")}
    assert set(ABLATION_ATTENTION) == built_in


@pytest.mark.parametrize("name", sorted(ABLATION_ATTENTION))
def test_every_mechanism_trains_one_step_in_the_stl_backbone(name):
    torch.manual_seed(0)
    model = BiFormerSTL(depths=(1, 1, 1, 1), attention=name, num_classes=4)  # STL's widths and heads
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 112, 112), torch.tensor([0, 3])
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > 0.9 * len(changed)
    kinds = {block.attn.__class__ for stage in model.stages for block in stage.blocks}
    # DAT-T (the deformable row) keeps window attention in stages 1-2, between its deformable blocks
    mixed = {"bra": ("bra", "full"), "deformable": ("swin", "deformable")}
    expected = {attentions.get(kind) for kind in mixed.get(name, (name,))}
    assert kinds == expected


def test_swin_in_the_backbone_shifts_every_second_block():
    model = BiFormerSTL(depths=(2, 2, 2, 2), attention="swin")
    shifts = [[block.attn.shift_size for block in stage.blocks] for stage in model.stages]
    assert shifts == [[0, 3], [0, 3], [0, 3], [0, 0]]


def test_pretrained_weights_are_refused_with_a_pointer_to_load_checkpoint():
    with pytest.raises(ValueError, match="load_checkpoint"):
        timm.create_model("biformer_tiny", pretrained=True)


def test_plain_copy_puts_every_bra_layer_on_the_reference_path():
    from attentions.bra import BiLevelRoutingAttention
    from attnbench.measure.correctness import plain_copy

    model = timm.create_model("biformer_tiny")
    plain = plain_copy(model)
    impls = [m.impl for m in plain.modules() if isinstance(m, BiLevelRoutingAttention)]
    assert len(impls) == 12 and set(impls) == {"reference"}
    assert {m.impl for m in model.modules() if isinstance(m, BiLevelRoutingAttention)} == {"auto"}
    for (name, tensor), other in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(tensor, other), name


def test_blocks_run_in_groups_of_images_as_the_same_function(monkeypatch):
    """BiFormer blocks split the batch into groups (BLOCK_CHUNK_BYTES); outputs and grads equal one piece."""
    import attnbench.models.biformer as biformer

    torch.manual_seed(0)
    options = dict(SMALL, n_win=2, topks=(1, 2, 3, -2))
    model = BiFormer(**options).double().train()
    plain = BiFormer(**options, impl="reference").double().train()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    monkeypatch.setattr(biformer, "BLOCK_CHUNK_BYTES", 2 * 16 * 16 * 16 * 3 * 8)  # 2 images per group, stage 1
    monkeypatch.setattr(attentions.by_image, "GROUP_MAX_THREADS", 1024)  # groups at any thread count
    out, expected = model(x), plain(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-10, msg=name)
