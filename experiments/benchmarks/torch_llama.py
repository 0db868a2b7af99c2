"""The PyTorch peer of genjax's transformer: the same Llama-style model, written plainly.

Used by `lm_train_speed.py` as the side-by-side reference (eager and `torch.compile`).
Nothing here is clever on purpose: it is the model a PyTorch user would write first —
`nn.Linear` without biases, `F.scaled_dot_product_attention(is_causal=True)`, and
`torch.optim.AdamW` — so that "genjax vs PyTorch" compares against an honest baseline.

Glossary of shapes: B batch, T time, D model, H query heads, G key/value heads,
K head dim, F SwiGLU hidden, V vocabulary.

Architecture (matches `genjax.models.transformer`): token embedding → L × [RMSNorm →
causal MHA with RoPE (rotate-half on [B, H, T, K]) → residual; RMSNorm → SwiGLU MLP →
residual] → final RMSNorm → LM head, tied by default (logits = h @ embed.T). RMSNorm eps 1e-5,
RoPE theta 10000, float32.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Config:
    """Model shape; field names match `genjax.models.transformer.Config`."""

    vocab_size: int = 4096
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 6
    head_dim: int = 64
    ffn_dim: int = 1024
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @classmethod
    def like(cls, other) -> Config:
        """The same shape as any config object with these field names (e.g. genjax's)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(other, n) for n in names if hasattr(other, n)})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, K] for the rotate-half convention (frequencies repeated twice)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs_TK2 = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb_TK = torch.cat([freqs_TK2, freqs_TK2], dim=-1)
    return emb_TK.cos(), emb_TK.sin()


def apply_rope(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTK.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTK * cos_TK + rotated * sin_TK


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.h, self.g, self.k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.h * self.k, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.g * self.k, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.g * self.k, bias=False)
        self.wo = nn.Linear(self.h * self.k, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TK, sin_TK) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTK = self.wq(x_BTD).view(B, T, self.h, self.k).transpose(1, 2)
        k_BGTK = self.wk(x_BTD).view(B, T, self.g, self.k).transpose(1, 2)
        v_BGTK = self.wv(x_BTD).view(B, T, self.g, self.k).transpose(1, 2)
        q_BHTK = apply_rope(q_BHTK, cos_TK, sin_TK)
        k_BGTK = apply_rope(k_BGTK, cos_TK, sin_TK)
        o_BHTK = F.scaled_dot_product_attention(
            q_BHTK, k_BGTK, v_BGTK, is_causal=True, enable_gqa=self.g != self.h
        )
        return self.wo(o_BHTK.transpose(1, 2).reshape(B, T, self.h * self.k))


class SwiGLU(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x_BTD)) * self.w_up(x_BTD))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x_BTD, cos_TK, sin_TK):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TK, sin_TK)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos_TK, sin_TK = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        # Buffers, not parameters: they are not trained and not counted.
        self.register_buffer("cos_TK", cos_TK, persistent=False)
        self.register_buffer("sin_TK", sin_TK, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2-style init; irrelevant to speed, but keeps the loss finite and comparable.
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02
                if name.endswith(("wo.weight", "w_down.weight")):
                    std /= math.sqrt(2 * self.cfg.num_layers)
                nn.init.normal_(p, std=std)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        T = tokens_BT.shape[1]
        cos_TK, sin_TK = self.cos_TK[:T], self.sin_TK[:T]
        x_BTD = self.embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, cos_TK, sin_TK)
        x_BTD = self.final_norm(x_BTD)
        if self.cfg.tie_embeddings:
            return x_BTD @ self.embed.weight.T  # logits_BTV
        return self.lm_head(x_BTD)


def lm_loss(model: nn.Module, tokens_BT1: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `tokens_BT1[:, 1:]` given `tokens_BT1[:, :-1]`."""
    logits_BTV = model(tokens_BT1[:, :-1])
    return F.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT1[:, 1:].flatten())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(
    model: nn.Module,
    *,
    lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains are not decayed), fused kernel on CPU."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def train_step(model, opt, loss_fn, tokens_BT1: torch.Tensor, *, clip_norm: float | None = 1.0):
    """One optimizer step; returns the loss tensor (not synchronized to Python)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens_BT1)
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm, foreach=True)
    opt.step()
    return loss.detach()
