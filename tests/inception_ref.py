"""An independent plain-PyTorch forward of the TF FID Inception-v3 ("inception-2015-12-05"), for tests only.

Written from the published Inception-v3 architecture (Szegedy et al. 2016; the block layout of torchvision's
`inception_v3` / pytorch-fid's `FIDInception*`), not from the TorchScript's code: only the weight tensors are taken
from the TorchScript's `state_dict()` (TF names: `mixed` = Mixed_5b ... `mixed_10` = Mixed_7c, `tower*` = branches).
The FID graph's known differences from torchvision's ImageNet model are built in:
  * batch norm has no scale (γ = 1) and ε = 0.001; every conv is conv → BN → ReLU, no bias;
  * the average pools inside the blocks ignore padding (count_include_pad=False), as TF's SAME-padded AvgPool;
  * the last block (Mixed_7c) pools its pool branch with a 3×3 *max* pool (a quirk of the 2015 graph);
  * features are the 2048-d average over the final 8×8 grid (`pool_3`), no dropout, no logits.
Runs in float64 so that its round-off is independent of the float32 TorchScript.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RefInception:
    def __init__(self, state_dict: dict, dtype=torch.float64):
        self.p = {k.removeprefix("net.layers."): v.to(dtype) for k, v in state_dict.items()}

    def conv(self, x, name, stride=1, padding=None):
        w = self.p[f"{name}.weight"]
        kh, kw = w.shape[-2:]
        pad = (kh // 2, kw // 2) if padding is None else padding  # "SAME" for stride-1 odd kernels
        x = F.conv2d(x, w, stride=stride, padding=pad)
        x = F.batch_norm(x, self.p[f"{name}.mean"], self.p[f"{name}.var"], None, self.p[f"{name}.beta"],
                         training=False, eps=1e-3)
        return F.relu(x)

    def seq(self, x, *names):
        for n in names:
            x = self.conv(x, n)
        return x

    @staticmethod
    def avg3(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def block_a(self, x, m):  # Mixed_5b/5c/5d: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avg→1x1
        return torch.cat([self.conv(x, f"{m}.conv"),
                          self.seq(x, f"{m}.tower.conv", f"{m}.tower.conv_1"),
                          self.seq(x, f"{m}.tower_1.conv", f"{m}.tower_1.conv_1", f"{m}.tower_1.conv_2"),
                          self.conv(self.avg3(x), f"{m}.tower_2.conv")], 1)

    def block_b(self, x, m):  # Mixed_6a (grid reduction): 3x3/2 | 1x1→3x3→3x3/2 | max 3x3/2
        t = self.seq(x, f"{m}.tower.conv", f"{m}.tower.conv_1")
        return torch.cat([self.conv(x, f"{m}.conv", stride=2, padding=0),
                          self.conv(t, f"{m}.tower.conv_2", stride=2, padding=0),
                          F.max_pool2d(x, 3, stride=2)], 1)

    def block_c(self, x, m):  # Mixed_6b..6e: 1x1 | 1x1→1x7→7x1 | 1x1→7x1→1x7→7x1→1x7 | avg→1x1
        return torch.cat([self.conv(x, f"{m}.conv"),
                          self.seq(x, *(f"{m}.tower.{c}" for c in ("conv", "conv_1", "conv_2"))),
                          self.seq(x, *(f"{m}.tower_1.{c}" for c in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"))),
                          self.conv(self.avg3(x), f"{m}.tower_2.conv")], 1)

    def block_d(self, x, m):  # Mixed_7a (grid reduction): 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | max 3x3/2
        a = self.conv(self.conv(x, f"{m}.tower.conv"), f"{m}.tower.conv_1", stride=2, padding=0)
        b = self.seq(x, f"{m}.tower_1.conv", f"{m}.tower_1.conv_1", f"{m}.tower_1.conv_2")
        b = self.conv(b, f"{m}.tower_1.conv_3", stride=2, padding=0)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)

    def block_e(self, x, m, max_pool: bool):  # Mixed_7b/7c: 1x1 | 1x1→(1x3,3x1) | 1x1→3x3→(1x3,3x1) | pool→1x1
        a = self.conv(x, f"{m}.tower_conv")
        b = self.seq(x, f"{m}.tower_1_conv", f"{m}.tower_1_conv_1")
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else self.avg3(x)
        return torch.cat([self.conv(x, f"{m}.conv"),
                          self.conv(a, f"{m}.tower_mixed_conv"), self.conv(a, f"{m}.tower_mixed_conv_1"),
                          self.conv(b, f"{m}.tower_1_mixed_conv"), self.conv(b, f"{m}.tower_1_mixed_conv_1"),
                          self.conv(pool, f"{m}.tower_2_conv")], 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 299, 299] in [-1, 0.9921875] → [N, 2048]."""
        x = x.to(self.p["conv.weight"].dtype)
        x = self.conv(x, "conv", stride=2, padding=0)       # Conv2d_1a_3x3 → 149
        x = self.conv(x, "conv_1", padding=0)               # Conv2d_2a_3x3 → 147
        x = self.conv(x, "conv_2", padding=1)               # Conv2d_2b_3x3
        x = F.max_pool2d(x, 3, stride=2)                    # → 73
        x = self.conv(x, "conv_3", padding=0)               # Conv2d_3b_1x1
        x = self.conv(x, "conv_4", padding=0)               # Conv2d_4a_3x3 → 71
        x = F.max_pool2d(x, 3, stride=2)                    # → 35
        for m in ("mixed", "mixed_1", "mixed_2"):
            x = self.block_a(x, m)                          # 256, 288, 288
        x = self.block_b(x, "mixed_3")                      # 768 @ 17
        for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
            x = self.block_c(x, m)
        x = self.block_d(x, "mixed_8")                      # 1280 @ 8
        x = self.block_e(x, "mixed_9", max_pool=False)      # 2048
        x = self.block_e(x, "mixed_10", max_pool=True)
        return x.mean(dim=(2, 3))                           # pool_3
