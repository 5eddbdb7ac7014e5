"""The course's models: an MLP, ResNet-18 for 32x32 images, and a tiny character-level GPT.

This module owns building each model with deterministic shapes; initial values come from the
caller's seed (`torch.manual_seed` before building), so every rank builds the same model. It
knows nothing about data sets, strategies or processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    in_features: int = 64,
    num_classes: int = 10,
    hidden: Sequence[int] = (128, 128),
) -> nn.Sequential:
    """A multilayer perceptron: Flatten, then Linear+ReLU per hidden width, then a classifier.

    The default fits scikit-learn's 8x8 digits (64 inputs); images of any shape are flattened.
    """
    _check_positive("in_features", in_features)
    _check_positive("num_classes", num_classes)
    widths = [int(in_features), *(int(h) for h in hidden)]
    for width in widths[1:]:
        _check_positive("hidden width", width)
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def resnet18_32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs (CIFAR-10), as in He et al. 2016, §4.2.

    The ImageNet stem (7x7 stride-2 conv, then a stride-2 max-pool) would shrink a 32x32 image
    to 8x8 before the first block; a 3x3 stride-1 conv and no max-pool keep 32x32 there, the
    usual adaptation. `in_channels=1` takes grey images (the 8x8 digits work too: the adaptive
    average pool at the end accepts any size).
    """
    from torchvision.models import resnet18

    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # (batch, head, time, head_dim): each head attends on its own slice of the channels
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """A decoder-only transformer over characters (GPT-2's layout, Radford et al. 2019).

    forward(idx) takes token ids of shape (batch, time) and returns logits of shape
    (batch, time, vocab_size). The output layer's weight is the token embedding's
    (`lm_head.weight is tok_emb.weight`), as in GPT-2 (Press & Wolf 2017): one tensor that
    receives gradient from both ends, which every strategy must count once.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            _check_positive(name, value)
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        # a Sequential, not a ModuleList: a container whose forward runs, so that module hooks
        # on it fire (ZeRO-3 gathers a unit's parameters in its forward pre-hook)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head, dropout) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so that the residual
        # stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        return self.lm_head(self.ln_f(self.blocks(x)))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0):
        """Append `max_new_tokens` sampled tokens to idx (batch, time) and return it."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1, :] / temperature
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return idx


def tiny_gpt(vocab_size: int, block_size: int = 64, **sizes) -> TinyGPT:
    """A TinyGPT; the defaults (2 layers, 4 heads, 64 channels) give about 0.1 M parameters
    plus 64 per vocabulary entry, small enough for quick steps on a CPU."""
    return TinyGPT(vocab_size, block_size=block_size, **sizes)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
