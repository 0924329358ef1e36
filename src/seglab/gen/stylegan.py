"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), sized for a CPU.

Generator, the paper's "skip" architecture:

- a mapping network: z is pixel-normalised, then ``mapping_layers`` equalised-learning-rate linear
  layers (learning rate x 0.01) map it to w;
- a learned constant at ``(ceil(H / 2^n), ceil(W / 2^n))``, ``n`` the fewest doublings that bring the
  long side to 4 or less: CamVid's 48x64 starts from 3x4, so a non-square image needs no padding;
  sizes that are not a multiple of 2^n are made a little larger and cropped (as DCGAN's are);
- at every resolution two modulated 3x3 convolutions (the first after a 2x upsampling): the weights
  are scaled per sample by a style (an affine map of w) and demodulated to unit output variance,
  run as one grouped convolution over the batch; then noise times a learned per-channel strength,
  a bias and a leaky ReLU (gain sqrt 2);
- a toRGB (modulated 1x1, not demodulated) at every resolution, summed up through 2x upsampling;
- ``w_avg``, a buffer: the moving average of w during training, for truncation at sampling,
  ``w = w_avg + psi (w - w_avg)``.

Style layers: ``num_ws = 2 n + 2`` ws, one per convolution and one per toRGB (which shares its w
with the next resolution's first convolution, as in the paper). Noise: ``random`` (fresh each call),
``const`` (one fixed map per layer, a buffer saved with the model) or ``none``; with ``const`` or
``none`` an image is a function of its ws alone, so truncation psi=0 gives one image, the mean image,
for every z.

Discriminator, the paper's "resnet" architecture: fromRGB, a residual block per resolution down to
the constant's size, the minibatch standard deviation as an extra channel, a 3x3 convolution and
two dense layers to one logit per image.

Simplifications against the paper, for size and readability: bilinear upsampling and 2x2 average
pooling instead of its FIR (blur) filters; no path-length regularisation; the output is not
clamped (images are clamped when converted to uint8). Layers hold their own parameters (no
nn.Conv2d / nn.Linear): their N(0, 1) init with the equalised learning rate is part of the design.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seglab.gen.models import pad_to

NOISE_MODES = ("random", "const", "none")
SQRT2 = math.sqrt(2)


def levels(size: Sequence[int]) -> int:
    """How many 2x steps from the constant to an image of ``size`` [H, W]: long side 4 or less first."""
    return max(0, math.ceil(math.log2(max(size) / 4)))


def base_size(size: Sequence[int]) -> tuple[int, int]:
    """The constant's [h, w]: the image size divided by 2^levels, rounded up."""
    n = 2 ** levels(size)
    return math.ceil(size[0] / n), math.ceil(size[1] / n)


def channels(width: int, n: int) -> list[int]:
    """Channels at each resolution from the constant's (index 0) to the image's (index n): ``width``
    at the image's, doubling towards the constant, up to 8x."""
    return [width * min(2 ** (n - i), 8) for i in range(n + 1)]


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * SQRT2  # the gain keeps the activations' scale


class EqualLinear(nn.Module):
    """A linear layer with the equalised learning rate: N(0, 1/lr_mul) weights, scaled by
    lr_mul / sqrt(fan_in) when used, so every layer learns at the same speed under Adam."""

    def __init__(self, cin: int, cout: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, act: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), bias_init / lr_mul))
        self.scale, self.lr_mul, self.act = lr_mul / math.sqrt(cin), lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return lrelu(x) if self.act else x


class EqualConv2d(nn.Module):
    """A convolution (stride 1, 'same' padding) with the equalised learning rate."""

    def __init__(self, cin: int, cout: int, kernel: int, *, bias: bool = True, act: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale, self.act = 1 / math.sqrt(cin * kernel * kernel), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        return lrelu(x) if self.act else x


def modulated_conv2d(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True
) -> torch.Tensor:
    """x [B, Cin, H, W], weight [Cout, Cin, k, k], styles [B, Cin] -> [B, Cout, H, W].

    Each sample's weights are scaled by its styles along the input channels and, with
    ``demodulate``, divided by their norm per output channel (unit output variance for unit input
    variance: what instance norm did in StyleGAN, without its droplet artefacts). The batch runs as
    one convolution with a group per sample."""
    b, cin, h, w = x.shape
    weights = weight[None] * styles[:, None, :, None, None]  # [B, Cout, Cin, k, k]
    if demodulate:
        weights = weights * torch.rsqrt(weights.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    k = weight.shape[-1]
    out = F.conv2d(x.reshape(1, b * cin, h, w), weights.reshape(-1, cin, k, k), padding=k // 2, groups=b)
    return out.reshape(b, -1, h, w)


class StyleConv(nn.Module):
    """(2x upsampling,) a modulated, demodulated 3x3 convolution, noise x per-channel strength, bias, leaky ReLU."""

    noise_const: torch.Tensor

    def __init__(self, cin: int, cout: int, w_dim: int, size: tuple[int, int], *, up: bool = False) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)  # styles start at 1: the plain convolution
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros(1, cout, 1, 1))  # learned from zero
        self.register_buffer("noise_const", torch.randn(1, 1, *size))  # the fixed map of noise="const"
        self.up = up

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: str) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = modulated_conv2d(x, self.weight, self.affine(w))  # demodulated: the weight's scale cancels
        if noise == "random":
            x = x + self.noise_strength * torch.randn(len(x), 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        elif noise == "const":
            x = x + self.noise_strength * self.noise_const
        return lrelu(x + self.bias.view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """A modulated 1x1 convolution to RGB, not demodulated (its output's scale is the image's)."""

    def __init__(self, cin: int, w_dim: int) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rgb = modulated_conv2d(x, self.weight * self.scale, self.affine(w), demodulate=False)
        return rgb + self.bias.view(1, -1, 1, 1)


class MappingNetwork(nn.Module):
    """z [B, z_dim] -> w [B, w_dim]: pixel norm, then an MLP at a hundredth of the learning rate."""

    def __init__(self, z_dim: int, w_dim: int, layers: int = 8) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*(EqualLinear(a, b, lr_mul=0.01, act=True) for a, b in itertools.pairwise(dims)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8))


class StyleGAN2Generator(nn.Module):
    """z [B, z_dim] -> image [B, 3, H, W] (about [-1, 1]). ``forward(z, mix=(z2, crossover))`` takes
    the ws of layers from ``crossover`` on from z2 (style mixing); ``psi`` truncates; ``noise`` is
    one of NOISE_MODES. ``mapping``, ``truncate`` and ``synthesis`` are the three steps, for sampling."""

    w_avg: torch.Tensor

    def __init__(
        self, z_dim: int, size: Sequence[int], *, width: int = 32, mapping_layers: int = 8, w_avg_beta: float = 0.995
    ) -> None:
        super().__init__()
        self.z_dim = self.w_dim = z_dim
        self.size = (int(size[0]), int(size[1]))
        self.levels = n = levels(size)
        bh, bw = base_size(size)
        c = channels(width, n)
        self.mapping = MappingNetwork(z_dim, self.w_dim, mapping_layers)
        self.const = nn.Parameter(torch.randn(1, c[0], bh, bw))
        self.convs = nn.ModuleList([StyleConv(c[0], c[0], self.w_dim, (bh, bw))])
        self.to_rgb = nn.ModuleList([ToRGB(c[0], self.w_dim)])
        for i in range(1, n + 1):
            at = (bh * 2**i, bw * 2**i)
            self.convs.append(StyleConv(c[i - 1], c[i], self.w_dim, at, up=True))
            self.convs.append(StyleConv(c[i], c[i], self.w_dim, at))
            self.to_rgb.append(ToRGB(c[i], self.w_dim))
        self.num_ws = 2 * n + 2
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(self.w_dim))

    def truncate(self, w: torch.Tensor, psi: float) -> torch.Tensor:
        """w_avg + psi (w - w_avg): psi 1 leaves w alone, psi 0 gives the mean w."""
        return self.w_avg.to(w.dtype).lerp(w, psi) if psi != 1 else w

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, w_dim] -> ws [B, num_ws, w_dim]: the same w for every layer."""
        return w[:, None].expand(-1, self.num_ws, -1)

    def synthesis(self, ws: torch.Tensor, noise: str = "random") -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> image [B, 3, H, W]."""
        x = self.convs[0](self.const.expand(len(ws), -1, -1, -1), ws[:, 0], noise)
        rgb = self.to_rgb[0](x, ws[:, 1])
        for i in range(1, self.levels + 1):
            x = self.convs[2 * i - 1](x, ws[:, 2 * i - 1], noise)
            x = self.convs[2 * i](x, ws[:, 2 * i], noise)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
            rgb = rgb + self.to_rgb[i](x, ws[:, 2 * i + 1])
        h, w = self.size
        return rgb[..., :h, :w]

    def forward(
        self,
        z: torch.Tensor,
        mix: tuple[torch.Tensor, int] | None = None,
        *,
        psi: float = 1.0,
        noise: str = "random",
        update_w_avg: bool = False,
    ) -> torch.Tensor:
        w = self.mapping(z)
        if update_w_avg:  # training: the mean w that truncation pulls towards
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = self.broadcast(self.truncate(w, psi))
        if mix is not None:
            z2, crossover = mix
            ws2 = self.broadcast(self.truncate(self.mapping(z2), psi))
            ws = torch.cat([ws[:, :crossover], ws2[:, crossover:]], dim=1)
        return self.synthesis(ws, noise)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """[B, C, H, W] -> [B, C + 1, H, W]: the standard deviation of every feature over a group of
    samples, averaged to one number per group, as an extra channel (a batch of near-copies shows)."""
    b, c, h, w = x.shape
    g = math.gcd(group, b)  # the group size must divide the batch
    y = x.float().reshape(g, b // g, c, h, w)  # sample k is in group k % (b // g)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B / g]
    y = y.repeat(g).view(b, 1, 1, 1).expand(-1, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class ResBlock(nn.Module):
    """3x3 convolution, 2x down, 3x3 convolution; a 1x1 skip from the down-sampled input; sum / sqrt 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(cin, cin, 3, act=True)
        self.conv1 = EqualConv2d(cin, cout, 3, act=True)
        self.skip = EqualConv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.avg_pool2d(self.conv0(x), 2))
        return (y + self.skip(F.avg_pool2d(x, 2))) / SQRT2


class StyleGAN2Discriminator(nn.Module):
    """image [B, 3, H, W] -> logit [B, 1]: residual blocks down to the generator's constant size,
    minibatch standard deviation, a 3x3 convolution and two dense layers. Images are padded to a
    multiple of 2^levels first, as the generator's output was cropped from one."""

    def __init__(self, size: Sequence[int], *, width: int = 64, mbstd_group: int = 4) -> None:
        super().__init__()
        self.levels = n = levels(size)
        bh, bw = base_size(size)
        c = channels(width, n)
        self.from_rgb = EqualConv2d(3, c[n], 1, act=True)
        self.blocks = nn.Sequential(*(ResBlock(c[i], c[i - 1]) for i in range(n, 0, -1)))
        self.mbstd_group = mbstd_group
        self.conv = EqualConv2d(c[0] + 1, c[0], 3, act=True)
        self.fc = EqualLinear(c[0] * bh * bw, c[0], act=True)
        self.out = EqualLinear(c[0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.from_rgb(pad_to(x, 2**self.levels)[0]))  # [B, c0, bh, bw]
        x = self.conv(minibatch_stddev(x, self.mbstd_group))
        return self.out(self.fc(x.flatten(1)))
