"""Loss pieces more than one method uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """1-D Gaussian window exp(-(x - size // 2)^2 / (2 sigma^2)), x = 0..size-1, summing to 1
    (centred for odd sizes; for even ones, as BVPN's SSIM.py, one sample longer on the left)."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004), per channel, Gaussian window, zero padding window // 2,
    C1 = 0.01^2, C2 = 0.03^2, mean over the whole map (an even window, BVPN's 32, gives a map one
    pixel larger, as the release's). The 2-D window is the outer product of `gaussian_window`, so
    the five local means run as one pair of 1-D convs."""
    c, pad = a.shape[1], window // 2
    g = gaussian_window(window, sigma).to(a.device, a.dtype)
    x = torch.cat([a, b, a * a, b * b, a * b], 1)
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(5 * c, 1, 1, window), padding=(0, pad), groups=5 * c)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(5 * c, 1, window, 1), padding=(pad, 0), groups=5 * c)
    mu_a, mu_b, aa, bb, ab = x.split(c, 1)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean()
