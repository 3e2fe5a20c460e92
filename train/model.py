"""PP-LCNet (Cui et al., 2021) with PaddleClas' layer names, so official checkpoints load unchanged.

Mirrors ``ppcls/arch/backbone/legendary_models/pp_lcnet.py``: the architecture is one stage table,
every scale is a width multiplier applied once through ``make_divisible``.
"""

from __future__ import annotations

import paddle
from paddle import nn
from paddle.nn.initializer import KaimingNormal
from paddle.regularizer import L2Decay

from .config import scale_of

# One row per depthwise-separable block:
#   (kernel size, in channels, out channels, stride, squeeze-excitation)
# Channels are for scale 1.0 and get multiplied by the scale, rounded to a multiple of 8.
STAGES: tuple[tuple[str, tuple[tuple[int, int, int, int, bool], ...]], ...] = (
    ("blocks2", ((3, 16, 32, 1, False),)),
    ("blocks3", ((3, 32, 64, 2, False), (3, 64, 64, 1, False))),
    ("blocks4", ((3, 64, 128, 2, False), (3, 128, 128, 1, False))),
    ("blocks5", ((3, 128, 256, 2, False),) + ((5, 256, 256, 1, False),) * 5),
    ("blocks6", ((5, 256, 512, 2, True), (5, 512, 512, 1, True))),
)
STEM_CHANNELS = 16
CLASS_EXPAND = 1280  # the "bigger 1x1 conv after GAP" that PP-LCNet adds before the classifier


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10 % (PaddleClas)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNLayer(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2D(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=(kernel - 1) // 2,
            groups=groups,
            weight_attr=paddle.ParamAttr(initializer=KaimingNormal()),
            bias_attr=False,
        )
        # PaddleClas does not weight-decay batch-norm parameters.
        no_decay = paddle.ParamAttr(regularizer=L2Decay(0.0))
        self.bn = nn.BatchNorm2D(out_ch, weight_attr=no_decay, bias_attr=no_decay)
        self.hardswish = nn.Hardswish()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.hardswish(self.bn(self.conv(x)))


class SEModule(nn.Layer):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(channels, channels // reduction, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2D(channels // reduction, channels, 1)
        self.hardsigmoid = nn.Hardsigmoid()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weight = self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))
        return x * weight


class DepthwiseSeparable(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, use_se: bool):
        super().__init__()
        self.dw_conv = ConvBNLayer(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.se = SEModule(in_ch) if use_se else None
        self.pw_conv = ConvBNLayer(in_ch, out_ch, 1, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.dw_conv(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw_conv(x)


class PPLCNet(nn.Layer):
    def __init__(self, scale: float, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.scale = scale
        self.conv1 = ConvBNLayer(3, make_divisible(STEM_CHANNELS * scale), 3, 2)
        for stage, rows in STAGES:
            blocks = [
                DepthwiseSeparable(
                    make_divisible(in_ch * scale), make_divisible(out_ch * scale), k, s, se
                )
                for k, in_ch, out_ch, s, se in rows
            ]
            setattr(self, stage, nn.Sequential(*blocks))
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        last_channels = make_divisible(STAGES[-1][1][-1][2] * scale)
        self.last_conv = nn.Conv2D(last_channels, CLASS_EXPAND, 1, bias_attr=False)
        self.hardswish = nn.Hardswish()
        # "downscale_in_infer" as in PaddleClas, so official weights give official logits.
        self.dropout = nn.Dropout(p=dropout, mode="downscale_in_infer")
        self.flatten = nn.Flatten(start_axis=1, stop_axis=-1)
        self.fc = nn.Linear(CLASS_EXPAND, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv1(x)
        for stage, _ in STAGES:
            x = getattr(self, stage)(x)
        x = self.hardswish(self.last_conv(self.avg_pool(x)))
        return self.fc(self.flatten(self.dropout(x)))


def build_model(name: str, num_classes: int = 1000, dropout: float = 0.2) -> PPLCNet:
    """Build ``PPLCNet_x0_25`` … ``PPLCNet_x2_5`` for ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return PPLCNet(scale_of(name), num_classes=num_classes, dropout=dropout)
