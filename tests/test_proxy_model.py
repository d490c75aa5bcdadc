"""The isotropic proxy backbone: every mechanism builds and trains, the query is found in the input, the head
reads only the query token, and the local mechanisms' reach is what the per-distance bins assume."""

import pytest
import timm
import torch

import attentions
from attnbench import models  # noqa: F401  (registers the models with timm)
from attnbench.data import write_colour_pointer
from attnbench.data.colour_pointer import GRID, load_index
from attnbench.models.proxy import PROXY_ATTENTION, IsotropicProxy, locate_query
from attnbench.train.classification import ClassificationTask
from attnbench.train.per_distance import BINS

NO_AUGMENT = {"auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "scale": [1.0, 1.0], "hflip": 0.0,
              "color_jitter": 0.0, "label_smoothing": 0.0, "drop_path_rate": 0.0, "crop_pct": 1.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_colour_pointer(tmp_path_factory.mktemp("cp") / "colour_pointer", train_images=60, val_images=60)


@pytest.fixture(scope="module")
def task(dataset):
    return ClassificationTask("cp", "attnbench_isotropic_proxy", {"attention": "full"}, {"root": str(dataset)}, 32,
                              16, 0, NO_AUGMENT)


def test_every_proxy_mechanism_is_registered_builds_and_backpropagates():
    assert set(PROXY_ATTENTION) <= set(attentions.available())
    x = torch.randn(2, 3, 32, 32)
    for name in PROXY_ATTENTION:
        model = timm.create_model("attnbench_isotropic_proxy", attention=name, num_classes=4)
        logits = model(x)
        assert logits.shape == (2, 4), name
        logits.sum().backward()
        assert model.stem.weight.grad is not None and torch.isfinite(model.stem.weight.grad).all(), name
    swin = timm.create_model("attnbench_isotropic_proxy", attention="swin")
    assert [block.attn.shift_size for block in swin.blocks] == [0, 2]  # shifted in the odd block, as Swin-T
    custom = timm.create_model("attnbench_isotropic_proxy", attention="bra", attention_options={"topk": 3})
    assert custom.blocks[0].attn.topk == 3 and custom.blocks[0].attn.n_win == 4


def test_the_query_is_found_in_every_image_as_the_task_feeds_it(task, dataset):
    index = load_index(dataset)
    for subset in (task.train, task.val):  # the training and evaluation transforms of the recipe
        for (path, _), number in zip(subset.samples, range(len(subset)), strict=True):
            image, _ = subset[number]
            row, column = index[path.relative_to(dataset).as_posix()]["query"]
            assert locate_query(image[None]).item() == row * GRID + column, path


PROBED = (0, 1, 6, 9, 14, 15)  # token rows/columns probed: both borders, next to them, and the middle


def reach(model: IsotropicProxy) -> torch.Tensor:
    """(6, 6): for the tokens at PROBED rows × columns, the largest Chebyshev distance (in tokens) of an input
    cell their output depends on, from the gradient of their features with respect to the image (float64,
    random weights)."""
    torch.manual_seed(0)
    model = model.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    features = model.forward_features(x)
    probe = torch.randn(features.shape[-1], dtype=torch.float64)  # the features' channel sum is 0 after LN
    rows, columns = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    result = torch.zeros(len(PROBED), len(PROBED), dtype=torch.long)
    for i, row in enumerate(PROBED):
        for j, column in enumerate(PROBED):
            (grad,) = torch.autograd.grad(features[0, row, column] @ probe, x, retain_graph=True)
            cells = grad[0].abs().sum(0).reshape(GRID, 2, GRID, 2).sum((1, 3)) > 1e-30  # swin's -100 mask: e^-100
            distance = torch.maximum((rows - row).abs(), (columns - column).abs())
            result[i, j] = distance[cells].max()
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name,largest", [("swin", 5), ("neighborhood", 6)])
def test_local_mechanisms_cannot_reach_the_far_bin(name, largest):
    # Two blocks of shifted 4-windows reach 5 tokens; 5×5 neighbourhoods reach 4 inside the map and 6 at its
    # border (NAT shifts the window inwards there). The far bin starts beyond both; full attention reaches all.
    local = reach(IsotropicProxy(attention=name))
    assert local.max().item() == largest
    assert BINS["far"][0] > largest and BINS["mid"][0] > 5
    corners_to_corners = reach(IsotropicProxy(attention="full"))
    assert corners_to_corners[0, 0].item() == GRID - 1 and corners_to_corners.min().item() >= GRID // 2


def test_head_reads_the_query_token_only():
    torch.manual_seed(0)
    model = IsotropicProxy(attention="full").eval()
    features = torch.randn(3, GRID, GRID, 64)
    query = torch.tensor([0, 17, 255])
    expected = model.head(features.flatten(1, 2)[torch.arange(3), query])
    assert torch.equal(model.forward_head(features, query), expected)
