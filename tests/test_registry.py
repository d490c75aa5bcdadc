"""The registry: names, options, errors, plug-ins through entry points, and the common interface."""

import textwrap

import pytest
import torch

import attentions
from attentions import registry


def test_available_lists_builtins_with_descriptions():
    names = attentions.available()
    assert {"full", "bra"} <= set(names)
    assert all(description for description in names.values())


def test_unknown_name_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown attention 'nope'; registered: .*bra.*full"):
        attentions.create("nope", dim=32, num_heads=4)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) n_wins for attention 'bra'; valid options: n_win, "):
        attentions.create("bra", dim=32, num_heads=4, n_wins=7)


def test_options_have_the_constructor_defaults():
    assert attentions.options("bra")["n_win"] == 7
    assert attentions.options("bra")["kv_downsample_mode"] == "identity"
    assert "dim" not in attentions.options("full") and "num_heads" not in attentions.options("full")


def test_register_rejects_a_second_class_under_a_taken_name():
    class Other(attentions.AttentionMechanism):
        def __init__(self, dim, num_heads):
            super().__init__()

        def macs(self, height, width):
            return attentions.MacCount()

    with pytest.raises(ValueError, match="'full' is already registered"):
        attentions.register("full")(Other)
    with pytest.raises(TypeError, match="subclass of AttentionMechanism"):
        attentions.register("not_a_mechanism")(torch.nn.Linear)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A third-party distribution on sys.path declaring two entry points: a good class and a broken one."""
    package = tmp_path / "third_party_attention"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import attentions

        class Identity(attentions.AttentionMechanism):
            """Returns its input (a plug-in for the tests)."""

            def __init__(self, dim, num_heads, gain: float = 1.0):
                super().__init__()
                self.dim, self.num_heads, self.gain = dim, num_heads, gain

            def forward(self, x):
                return self.gain * x

            def macs(self, height, width):
                return attentions.MacCount({})
    '''))
    dist_info = tmp_path / "third_party_attention-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-attention\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[attnbench.attentions]\n"
        "plugin_identity = third_party_attention:Identity\n"
        "plugin_broken = third_party_attention:DoesNotExist\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return tmp_path


def test_entry_point_plugins_register_and_broken_ones_warn(plugin_dir):
    with pytest.warns(UserWarning, match="plug-in 'plugin_broken'.*failed to load"):
        names = attentions.available()
    assert names["plugin_identity"] == "Returns its input (a plug-in for the tests)."
    assert "plugin_broken" not in names
    module = attentions.create("plugin_identity", dim=8, num_heads=1, gain=2.0)
    x = torch.randn(1, 3, 3, 8)
    torch.testing.assert_close(module(x), 2 * x)


@pytest.mark.parametrize("name", sorted(attentions.available()))
def test_every_mechanism_keeps_the_shape_and_checks_its_input(name):
    module = attentions.create(name, dim=48, num_heads=6)  # every mechanism's default options
    x = torch.randn(2, 14, 28, 48)
    assert module(x).shape == x.shape
    with pytest.raises(ValueError, match=r"expects x of shape \(B, H, W, 48\)"):
        module(torch.randn(2, 48, 14, 28)[..., :16])
    try:
        assert module(torch.randn(1, 15, 9, 48)).shape == (1, 15, 9, 48)
    except ValueError as error:  # a mechanism that does not pad by default must name the sizes
        assert "15" in str(error) and "9" in str(error)
