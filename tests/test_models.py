"""Networks: published parameter counts, Table 1 multiplications, MAC ratios, forward/backward of every network,
receptive fields of the asymmetric cascades, and the `asym3d models` command."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import model
from cli import main
from model import ASYM_3, ASYM_5, AsymConv3d, MicroNet

# Exact counts for 101 classes, docs/DESIGN.md's table (the paper prints them truncated to 0.01M, and the b8
# asymmetric and MicroNet rows 0.01M and 0.03M below these). The paper prints none for asym3d and its m2/m3
# ablations: those are this specification's own values.
PARAMS_101 = {
    "c3d-b8": 78_409_573,
    "c3d-b5": 17_444_965,
    "b5-asyConv3": 17_052_261,
    "b5-asyConv4": 16_265_829,
    "b5-asyConv5": 16_265_829,
    "b5-asyConv34": 15_873_125,
    "b5-asyConv35": 15_873_125,
    "b5-asyConv45": 15_086_693,
    "b5-asyConv345": 14_693_989,
    "b8-asyConv3": 76_443_749,
    "b8-asyConv4": 70_545_765,
    "b8-asyConv5": 67_662_181,
    "b8-asyConv34": 68_579_941,
    "b8-asyConv35": 65_696_357,
    "b8-asyConv45": 59_798_373,
    "b8-asyConv345": 57_832_549,
    "b5-M1": 16_102_133,
    "b5-M2": 16_071_445,
    "b5-M3": 15_905_781,
    "b5-M4": 15_875_093,
    "asym3d": 53_748_117,
    "asym3d-m2": 54_411_221,
    "asym3d-m3": 52_919_349,
}

# docs/DESIGN.md: MAC ratios to the baseline at 16x112x112 (the ideal speed-up of each substitution).
MAC_RATIOS = {
    "b5-asyConv3": 0.87, "b5-asyConv4": 0.95, "b5-asyConv5": 0.99, "b5-asyConv34": 0.82,
    "b5-asyConv35": 0.87, "b5-asyConv45": 0.95, "b5-asyConv345": 0.82,
    "b8-asyConv3": 0.68, "b8-asyConv4": 0.84, "b8-asyConv5": 0.97, "b8-asyConv34": 0.52,
    "b8-asyConv35": 0.65, "b8-asyConv45": 0.81, "b8-asyConv345": 0.49,
}  # fmt: skip

SMALL_CLIP = (16, 16, 16)  # the smallest clip the five pools accept: pool5 sees 1x1x1


def test_registry_lists_the_23_networks() -> None:
    assert sorted(model.list_models()) == sorted(PARAMS_101)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(KeyError) as err:
        model.build_model("c3d-b6")
    assert "c3d-b6" in str(err.value) and "b5-asyConv345" in str(err.value)


@pytest.mark.parametrize("name", list(PARAMS_101))
def test_parameter_count_matches_design_and_built_module(name: str) -> None:
    params, _ = model.count(name, num_classes=101)
    assert params == PARAMS_101[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = model.build_model(name, num_classes=101)
    assert sum(p.numel() for p in net.parameters()) == params


def test_design_document_table_is_the_registry() -> None:
    design = (Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md").read_text()
    rows = dict(re.findall(r"^\| ([\w-]+) \| ([\d,]+) \|", design, flags=re.MULTILINE))
    assert {name: int(count.replace(",", "")) for name, count in rows.items()} == PARAMS_101


def test_pairwise_savings_add_up() -> None:
    """Replacing two stages saves exactly what replacing each alone saves (independent check of the table)."""
    base = PARAMS_101["c3d-b8"]
    for pair in ("35", "45", "34"):
        a, b = (PARAMS_101[f"b8-asyConv{d}"] for d in pair)
        assert PARAMS_101[f"b8-asyConv{pair}"] == a + b - base


@pytest.mark.parametrize("name", ["c3d-b8", "b8-asyConv345", "b5-M4", "asym3d"])
def test_batch_norm_counted_like_built(name: str) -> None:
    with torch.device("meta"):
        net = model.build_model(name, num_classes=7, clip=(16, 32, 48), batch_norm=True)
    params, _ = model.count(name, num_classes=7, clip=(16, 32, 48), batch_norm=True)
    assert sum(p.numel() for p in net.parameters()) == params
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def _measured_macs(net: nn.Module, clip: tuple[int, int, int]) -> int:
    """MACs by running the built module on a meta tensor and reading every conv's and linear's real output."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv3d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += output[0].numel() * per_output
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    with torch.device("meta"):
        net(torch.empty(1, 3, *clip))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("name", list(PARAMS_101))
def test_counted_macs_equal_macs_of_built_module(name: str) -> None:
    clip = (16, 112, 112)
    with torch.device("meta"):
        net = model.build_model(name, clip=clip)
    assert _measured_macs(net, clip) == model.count(name, clip=clip)[1]


def test_c3d_macs_per_layer_match_table1() -> None:
    """Table 1 of the paper for C3D at 16x112x112. conv3 and the total are what the layer sizes give (the paper
    prints 31.12B and 52.97B, which they do not give; see model.counting)."""
    macs = {row.name: row.macs for row in model.layer_costs("c3d-b8", clip=(16, 112, 112))}
    for layer, billions in {"conv1": 1.04, "conv2": 11.09, "conv4": 8.33, "conv5": 1.39, "conv3": 16.65}.items():
        assert macs[layer] == pytest.approx(billions * 1e9, rel=2e-3), layer
    assert sum(macs.values()) == pytest.approx(38.5e9, rel=2e-3)


@pytest.mark.parametrize("name", list(MAC_RATIOS))
def test_mac_ratios_match_design(name: str) -> None:
    (row,) = model.model_summary([name])
    assert round(row.mac_ratio, 2) == MAC_RATIOS[name]
    assert row.baseline == ("c3d-b5" if name.startswith("b5") else "c3d-b8")


def test_baseline_macs() -> None:
    assert model.count("c3d-b5")[1] / 1e9 == pytest.approx(19.26, abs=0.005)
    assert model.count("c3d-b8")[1] / 1e9 == pytest.approx(38.55, abs=0.005)


@pytest.mark.parametrize("name", list(PARAMS_101))
def test_forward_backward_gives_logits(name: str) -> None:
    torch.manual_seed(0)
    net = model.build_model(name, num_classes=5, clip=SMALL_CLIP)
    x = torch.randn(2, 3, *SMALL_CLIP)
    logits = net(x)
    assert logits.shape == (2, 5)
    nn.functional.cross_entropy(logits, torch.tensor([0, 4])).backward()
    assert net.fc8.weight.grad is not None and net.fc8.weight.grad.abs().sum() > 0
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv3d))
    assert first_conv.weight.grad is not None and torch.isfinite(first_conv.weight.grad).all()


def test_options_batch_norm_and_relu_inside_cascade() -> None:
    net = model.build_model("b5-asyConv345", num_classes=3, in_channels=2, clip=SMALL_CLIP, batch_norm=True,
                            relu_inside_asym=True, dropout=0.2)  # fmt: skip
    cascade = next(m for m in net.modules() if isinstance(m, AsymConv3d))
    kinds = [type(m) for m in cascade]
    assert kinds == [nn.Conv3d, nn.BatchNorm3d, nn.ReLU, nn.Conv3d, nn.BatchNorm3d, nn.ReLU, nn.Conv3d]
    assert net.dropout.p == 0.2
    assert net(torch.randn(2, 2, *SMALL_CLIP)).shape == (2, 3)


def test_arch_rebuilds_the_same_network() -> None:
    net = model.build_model("asym3d", num_classes=4, clip=SMALL_CLIP)
    assert net.name == "asym3d" and net.spec is model.get_spec("asym3d")
    again = model.build_model(**net.arch)
    again.load_state_dict(net.state_dict())  # strict: same architecture, same names
    net.eval(), again.eval()
    x = torch.randn(1, 3, *SMALL_CLIP)
    torch.testing.assert_close(again(x), net(x))


def test_weight_init_schemes_fill_as_documented() -> None:
    def build(scheme: str) -> model.Net3D:
        torch.manual_seed(0)
        return model.build_model("c3d-b5", num_classes=4, clip=SMALL_CLIP, weight_init=scheme)

    def conv(net: model.Net3D, stage: str) -> nn.Conv3d:
        return getattr(net.features, stage).columns[0][0][0]

    default = model.build_model("c3d-b5", num_classes=4, clip=SMALL_CLIP)
    assert default.arch["weight_init"] == model.WEIGHT_INITS[0] == "he-torchfc"
    nets = {scheme: build(scheme) for scheme in model.WEIGHT_INITS}
    he_conv2 = conv(nets["he"], "conv2").weight
    assert he_conv2.std().item() == pytest.approx(math.sqrt(2 / (64 * 27)), rel=0.05)  # He, ReLU gain
    fan_in = nets["he"].fc6.in_features
    for scheme in ("he-torchfc", "he-smallfc"):  # the same He convs; only fc6/fc7 differ
        torch.testing.assert_close(conv(nets[scheme], "conv2").weight, he_conv2)
    assert nets["he"].fc6.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert nets["he-torchfc"].fc6.weight.abs().max().item() <= 1 / math.sqrt(fan_in)  # PyTorch: U(+-1/sqrt(fan_in))
    assert nets["he-smallfc"].fc6.weight.std().item() == pytest.approx(0.005, rel=0.05)
    c3d = nets["c3d"]
    assert conv(c3d, "conv2").weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not conv(c3d, "conv1").bias.any() and (conv(c3d, "conv2").bias == 1).all() and (c3d.fc7.bias == 1).all()
    assert c3d.fc7.weight.std().item() == pytest.approx(0.005, rel=0.05) and not c3d.fc8.bias.any()
    assert conv(nets["torch"], "conv2").weight.abs().max().item() <= 1 / math.sqrt(64 * 27)
    with pytest.raises(ValueError, match="he-torchfc"):
        build("xavier")


def test_default_init_starts_with_a_small_gradient() -> None:
    """Issue 16: He-normal fc6/fc7 give a first gradient norm several times the default's (loss spikes follow)."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, *SMALL_CLIP), torch.tensor([0, 1, 2, 3])
    norms = {}
    for scheme in ("he-torchfc", "he"):
        torch.manual_seed(0)
        net = model.build_model("asym3d", num_classes=4, clip=SMALL_CLIP, dropout=0.0, weight_init=scheme)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        norms[scheme] = torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item()
        if scheme == "he-torchfc":
            assert loss.item() == pytest.approx(math.log(4), abs=0.05)  # logits start near zero
    assert norms["he"] > 3 * norms["he-torchfc"]


def test_fc6_follows_clip_and_small_clips_fail_clearly() -> None:
    assert model.build_model("c3d-b5", clip=(16, 112, 112)).fc6.in_features == 256 * 1 * 4 * 4
    assert model.build_model("c3d-b5", clip=(32, 64, 80)).fc6.in_features == 256 * 2 * 3 * 3
    with pytest.raises(ValueError, match="too small"):
        model.build_model("c3d-b5", clip=(8, 32, 32))


def _support(response: torch.Tensor) -> tuple[int, int, int]:
    """Extent (T, H, W) of the non-zero region of a (1, 1, T, H, W) response."""
    nonzero = response[0, 0].nonzero()
    return tuple(int(nonzero[:, axis].max() - nonzero[:, axis].min() + 1) for axis in range(3))  # type: ignore


def _impulse_response(module: nn.Module) -> torch.Tensor:
    """Response to a centred delta with all-positive weights, so no cancellation can hide part of the field."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.uniform_(p, 0.1, 1.0)
        else:
            nn.init.zeros_(p)
    delta = torch.zeros(1, 1, 11, 11, 11)
    delta[0, 0, 5, 5, 5] = 1.0
    with torch.no_grad():
        return module(delta)


@pytest.mark.parametrize("relu_inside", [False, True])
def test_asym3_cascade_has_the_receptive_field_of_3x3x3(relu_inside: bool) -> None:
    full = _impulse_response(nn.Conv3d(1, 1, 3, padding=1))
    cascade = _impulse_response(AsymConv3d(1, 4, ASYM_3, relu_inside=relu_inside).append(nn.Conv3d(4, 1, 1)))
    assert _support(cascade) == _support(full) == (3, 3, 3)
    assert torch.equal(cascade != 0, full != 0)


def test_asym5_cascade_covers_the_group_of_two_3x3x3_spatially() -> None:
    """The b8 group: two 3x3x3 layers see 5x5x5; 1x5x1, 1x1x5, 3x1x1 see 3x5x5 -- the same spatial field, and the
    temporal 3 the paper chose on purpose (§3.1, 'Why not using 5x1x1')."""
    group = _impulse_response(nn.Sequential(nn.Conv3d(1, 1, 3, padding=1), nn.Conv3d(1, 1, 3, padding=1)))
    cascade = _impulse_response(AsymConv3d(1, 1, ASYM_5))
    reference = _impulse_response(nn.Conv3d(1, 1, (3, 5, 5), padding=(1, 2, 2)))
    assert _support(group) == (5, 5, 5)
    assert _support(cascade) == (3, 5, 5)
    assert torch.equal(cascade != 0, reference != 0)


@pytest.mark.parametrize("variant", ["M1", "M2", "M3", "M4"])
def test_micronet_keeps_size_and_produces_n_channels(variant: str) -> None:
    block = MicroNet(24, 64, variant)
    assert block(torch.randn(1, 24, 4, 8, 8)).shape == (1, 64, 4, 8, 8)
    cascades = [m.kernels for m in block.modules() if isinstance(m, AsymConv3d)]
    expected = {"M1": [], "M2": [ASYM_5], "M3": [ASYM_3], "M4": [ASYM_5, ASYM_3]}[variant]
    assert sorted(cascades) == sorted(expected)


def test_bad_block_arguments_raise() -> None:
    with pytest.raises(ValueError, match="variant"):
        MicroNet(8, 64, "M5")
    with pytest.raises(ValueError, match="multiple of 16"):
        MicroNet(8, 60, "M1")
    with pytest.raises(ValueError, match="odd"):
        AsymConv3d(8, 8, [(1, 2, 1)])


def test_cli_models_json_lists_every_network() -> None:
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["name"]: r["params"] for r in rows} == PARAMS_101
    assert all(r["macs"] > 0 for r in rows)


def test_cli_models_layers_markdown_and_errors() -> None:
    runner = CliRunner()
    layers = runner.invoke(main, ["models", "--layers", "c3d-b8", "--json", "--clip", "16x56x56", "--classes", "51"])
    assert layers.exit_code == 0, layers.output
    rows = json.loads(layers.output)
    assert [r["name"] for r in rows][:2] == ["conv1", "pool1"] and rows[-1]["out_shape"] == [51]
    markdown = runner.invoke(main, ["models", "--markdown"])
    assert markdown.exit_code == 0
    assert sum(line.startswith("| ") for line in markdown.output.splitlines()) == 1 + len(PARAMS_101)
    assert "| asym3d |" in markdown.output and "53,748,117" in markdown.output
    bad_clip = runner.invoke(main, ["models", "--clip", "16x112"])
    assert bad_clip.exit_code == 2 and "TxHxW" in bad_clip.output
    unknown = runner.invoke(main, ["models", "--layers", "c3d-b9"])
    assert unknown.exit_code == 1 and "unknown model 'c3d-b9'" in unknown.output and "asym3d-m3" in unknown.output
