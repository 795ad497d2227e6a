"""The speaker encoder: 16 kHz speech -> a 512-d speaker embedding that conditions HiFi-GAN.

A squeeze-and-excitation ResNet over a log-mel spectrogram (its own front-end: pre-emphasis,
Hamming-window STFT, 64 HTK mel bands, per-utterance instance norm), pooled over time with
attentive statistics (weighted mean and standard deviation) and projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowvox.audio.mel import MelConfig, power_spectrogram


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    """Sizes of the speaker encoder and its front-end (the released model's values)."""

    sample_rate: int = 16000
    fft_size: int = 512
    win_length: int = 400
    hop_length: int = 160
    num_mels: int = 64
    preemphasis: float = 0.97
    layers: tuple[int, ...] = (3, 4, 6, 3)
    num_filters: tuple[int, ...] = (32, 64, 128, 256)
    proj_dim: int = 512
    attention_dim: int = 128

    @property
    def mel(self) -> MelConfig:
        return MelConfig(
            sample_rate=self.sample_rate,
            n_fft=self.fft_size,
            hop_length=self.hop_length,
            win_length=self.win_length,
            n_mels=self.num_mels,
            norm=None,
            window="hamming",
        )


class _PreEmphasis(nn.Module):
    """y[n] = x[n] - a * x[n-1], reflecting x[1] in front of the first sample."""

    filter: torch.Tensor  # [1, 1, 2]

    def __init__(self, coefficient: float) -> None:
        super().__init__()
        self.register_buffer("filter", torch.tensor([[[-coefficient, 1.0]]]))  # [1, 1, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.unsqueeze(1), (1, 0), mode="reflect")  # [B, 1, N + 1]
        return F.conv1d(x, self.filter).squeeze(1)


class _Window(nn.Module):
    window: torch.Tensor  # [win_length]

    def __init__(self, window: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("window", window)


class _MelScale(nn.Module):
    fb: torch.Tensor  # [n_fft // 2 + 1, n_mels]

    def __init__(self, fb: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fb", fb)


class _MelFrontEnd(nn.Module):
    """Power mel spectrogram; the window and filterbank are checkpoint buffers
    (`spectrogram.window`, `mel_scale.fb`), so a checkpoint's stored copies are used as is."""

    def __init__(self, config: MelConfig) -> None:
        super().__init__()
        self.n_fft = config.n_fft
        self.hop_length = config.hop_length
        self.spectrogram = _Window(config.make_window())
        self.mel_scale = _MelScale(config.make_filterbank())

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = power_spectrogram(wave, self.n_fft, self.hop_length, self.spectrogram.window)
        # [B, F, T] -> [B, T, F] @ [F, M] -> [B, M, T]
        return torch.matmul(power.transpose(1, 2), self.mel_scale.fb).transpose(1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc(x.mean(dim=(2, 3)))  # [B, C]
        return x * scale[:, :, None, None]


class SEBasicBlock(nn.Module):
    """conv-relu-bn-conv-bn-SE plus a (projected) shortcut; note relu comes before bn1."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(F.relu(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNetSpeakerEncoder(nn.Module):
    """`[B, N]` 16 kHz audio -> `[B, proj_dim]` speaker embedding."""

    def __init__(self, config: SpeakerEncoderConfig | None = None) -> None:
        super().__init__()
        config = config or SpeakerEncoderConfig()
        self.config = config
        self.torch_spec = nn.Sequential(_PreEmphasis(config.preemphasis), _MelFrontEnd(config.mel))
        nf = config.num_filters
        self.conv1 = nn.Conv2d(1, nf[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(nf[0])
        inplanes = nf[0]
        for i, (planes, blocks) in enumerate(zip(nf, config.layers, strict=True)):
            stride = 1 if i == 0 else 2
            layer = [SEBasicBlock(inplanes, planes, stride)]
            layer += [SEBasicBlock(planes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes
        self.num_stages = len(nf)
        # Each stride-2 stage halves the mel axis; what is left is flattened into channels.
        pooled = nf[-1] * (config.num_mels // 2 ** (len(nf) - 1))
        self.attention = nn.Sequential(
            nn.Conv1d(pooled, config.attention_dim, 1),
            nn.ReLU(),
            nn.BatchNorm1d(config.attention_dim),
            nn.Conv1d(config.attention_dim, pooled, 1),
            nn.Softmax(dim=2),
        )
        self.fc = nn.Linear(pooled * 2, config.proj_dim)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding of `[B, N]` audio: `[B, proj_dim]`."""
        x = self.torch_spec(audio)  # [B, M, T]
        x = torch.log(x + 1e-6)
        x = F.instance_norm(x).unsqueeze(1)  # per band, over time: [B, 1, M, T]
        x = self.bn1(F.relu(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = x.flatten(1, 2)  # [B, C * M', T']
        w = self.attention(x)  # softmax over time
        mu = torch.sum(x * w, dim=2)
        sigma = torch.sqrt((torch.sum(x * x * w, dim=2) - mu * mu).clamp(min=1e-5))
        return self.fc(torch.cat((mu, sigma), dim=1))

    def embed(self, audio16k: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding of `[B, N]` audio at `sample_rate`: `[B, proj_dim]`."""
        return F.normalize(self(audio16k), p=2, dim=1)
