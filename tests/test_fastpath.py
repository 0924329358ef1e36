"""The CPU bfloat16 fast path: depthwise convolutions kept in float32 where that is faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seglab
from seglab.data.synthetic import make_shapes_dataset
from seglab.engine.fastpath import Float32Conv2d, depthwise_convs, run_in_float32, tune_depthwise
from seglab.models import build_model


def small_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lraspp", num_classes=3, encoder="mobilenet_v3_small").eval()


def test_depthwise_convs_are_found_and_only_they():
    model = small_mobilenet()
    convs = depthwise_convs(model)
    assert convs, "MobileNetV3 has depthwise convolutions"
    assert all(c.groups == c.in_channels > 1 for c in convs.values())
    dense = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert dense and not any(m in convs.values() for m in dense)


def test_float32_layers_run_in_float32_and_keep_the_state_dict():
    model = small_mobilenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(depthwise_convs(model)))
    run_in_float32(model, [name])
    conv = dict(model.named_modules())[name]
    assert type(conv) is Float32Conv2d
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    x = torch.randn(1, conv.in_channels, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.bfloat16()).dtype == torch.float32
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, groups=conv.groups)
        assert plain(x).dtype == torch.bfloat16  # what autocast does without the swap
    out_fp32 = conv(x)
    run_in_float32(model, [])  # and back
    assert type(conv) is nn.Conv2d
    assert torch.equal(conv(x), out_fp32)


def test_tuning_returns_depthwise_layers_and_applies_exactly_those():
    model = small_mobilenet()
    chosen = tune_depthwise(model, torch.zeros(2, 3, 64, 64), repeats=1)
    convs = depthwise_convs(model)
    assert set(chosen) <= set(convs)
    assert {n for n, c in convs.items() if type(c) is Float32Conv2d} == set(chosen)
    assert not model.training  # the mode it had is restored


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=2, size=32, seed=2)


def test_the_trainer_saves_its_float32_layers_and_a_resumed_run_keeps_them(tmp_path, shapes):
    base = dict(
        data=str(shapes),
        model="lraspp",
        encoder="mobilenet_v3_small",
        epochs=1,
        batch=4,
        img_size=32,
        workers=0,
        out=str(tmp_path),
        amp=True,
        amp_dtype="bfloat16",  # named, so it autocasts on a CPU without bfloat16 instructions too
    )
    messages: list[str] = []
    run = seglab.train(progress=False, log=messages.append, **base)
    assert any("depthwise convolutions run in float32" in m for m in messages), messages
    ckpt = torch.load(run.last, weights_only=False)
    names = list(depthwise_convs(build_model("lraspp", num_classes=3, encoder="mobilenet_v3_small")))
    assert set(ckpt["task_state"]["fp32_layers"]) <= set(names)

    # a resumed run uses the saved choice, not a new measurement: plant one to tell them apart
    planted = names[:2]
    ckpt["task_state"]["fp32_layers"] = planted
    torch.save(ckpt, run.last)
    messages.clear()
    seglab.train(progress=False, log=messages.append, resume=str(run.last), epochs=2)
    assert any(f"{len(planted)} of {len(names)} depthwise" in m for m in messages), messages
    assert torch.load(run.last, weights_only=False)["task_state"]["fp32_layers"] == planted


@pytest.mark.parametrize("arch, encoder", [("lraspp", "mobilenet_v3_small"), ("unet", "resnet18")])
def test_folding_batchnorm_keeps_the_outputs(arch, encoder):
    from seglab.engine.fastpath import fold_batchnorm

    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, encoder=encoder)
    model.train()(torch.randn(2, 3, 64, 64))  # running statistics that are not the identity
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        folded = fold_batchnorm(model)
        after = model(x)
    assert folded > 0.7 * bns  # ResNet's and MobileNet's conv+BN pairs are found
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns - folded
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_a_model_without_depthwise_convolutions_is_left_alone():
    model = build_model("fcn", num_classes=3, encoder="resnet18")
    assert depthwise_convs(model) == {}
    assert tune_depthwise(model, torch.zeros(1, 3, 32, 32)) == []
