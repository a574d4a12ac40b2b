"""The GPT of nanoGPT (https://github.com/karpathy/nanoGPT, model.py), inference-first and exportable.

Same architecture, parameter names and initialisation as nanoGPT, so its checkpoints load strictly.
Two forwards:
- `forward(idx, targets=None)`: nanoGPT's, for training and as the reference.
- `forward_cached(...)`: the exported graph. Attention is written out as MatMul, scale, mask,
  Softmax, MatMul (no fused op) and takes a KV cache, so one graph serves prefill and decode.
Reduced-precision models keep LayerNorm, softmax and the logits in fp32 (LayerNorm in fp16 overflows).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from ..config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1); computed in fp32."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, 1e-5).to(x.dtype)


def attention_masks(past_length: torch.Tensor, P: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query sees, computed once per forward for every block.

    Each sequence (row b) has its own past_length[b]: key j of its past buffer is visible when
    j < past_length[b] (the slots beyond are unused cache: another row's longer history, or room
    to grow); new key t is visible to new query i when t <= i, the same for every row. Returns
    (past (B, 1, 1, P), new (1, 1, T, T)) boolean masks, broadcast over heads and queries.
    """
    past = torch.arange(P, device=past_length.device)[None, :] < past_length[:, None]  # (B, P)
    new = torch.ones(T, T, dtype=torch.bool, device=past_length.device).tril()  # (T, T): t <= i
    return past[:, None, None, :], new[None, None]


def attend(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal attention over [past buffer | new positions], as an explicit mask graph.

    Scores against the past and the new keys are masked (attention_masks) and concatenated,
    rather than the keys themselves, so the cache is only read, never copied.
    """
    hs = q.size(3)
    scale = 1.0 / math.sqrt(hs)
    past_visible, new_visible = masks
    P = k_past.size(2)
    past_scores = (q @ k_past.transpose(-2, -1)).float() * scale  # (B, nh, T, P)
    new_scores = (q @ k_new.transpose(-2, -1)).float() * scale  # (B, nh, T, T)
    scores = torch.cat([past_scores.masked_fill(~past_visible, float("-inf")),
                        new_scores.masked_fill(~new_visible, float("-inf"))], dim=-1)  # (B, nh, T, P+T)
    probs = F.softmax(scores, dim=-1).to(v_new.dtype)
    return probs[..., :P] @ v_past + probs[..., P:] @ v_new  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.size()
        # one reshape, transpose and split for all three (3 graph nodes rather than 7: at batch 1
        # a decode step's time is partly a cost per node); q, k, v each (B, nh, T, hs)
        heads = self.c_attn(x).view(B, T, 3 * self.n_head, C // self.n_head).transpose(1, 2)
        q, k, v = heads.split(self.n_head, dim=1)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(self, x, k_past, v_past, masks):
        B, T, C = x.size()
        q, k, v = self.qkv(x)
        y = attend(q, k_past, v_past, k, v, masks)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), k, v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, k_past, v_past, masks):
        a, k, v = self.attn.forward_cached(self.ln_1(x), k_past, v_past, masks)
        x = x + a
        return x + self.mlp(self.ln_2(x)), k, v


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # scaled init of the residual projections, per the GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """nanoGPT's forward: (logits, loss); without targets only the last position's logits."""
        b, t = idx.size()
        assert t <= self.config.block_size, (
            f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # shape (t)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x).float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :]).float()  # note: using list [-1] to preserve the time dim
            loss = None
        return logits, loss

    def forward_cached(self, input_ids: torch.Tensor, past_length: torch.Tensor,
                       logit_positions: torch.Tensor, past: list[torch.Tensor]):
        """The exported graph (see config.py): returns (logits, [new_key.0, new_value.0, ...]).

        past_length (B,): each sequence's own count of cached positions, so sequences at different
        lengths share one forward; row b's new tokens sit at positions past_length[b] + 0..T-1.
        """
        T = input_ids.size(1)
        pos = past_length[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        masks = attention_masks(past_length, past[0].size(2), T)
        new = []
        for i, block in enumerate(self.transformer.h):
            x, k, v = block.forward_cached(x, past[2 * i], past[2 * i + 1], masks)
            new += [k, v]
        x = self.transformer.ln_f(x.index_select(1, logit_positions))  # ln_f is per position: select first
        logits = self.lm_head(x).float()  # (B, num_logits, vocab)
        return logits, new

    def empty_past(self, batch: int, length: int = 0) -> list[torch.Tensor]:
        c, p = self.config, next(self.parameters())
        shape = (batch, c.n_head, length, c.head_dim)
        return [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(2 * c.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """nanoGPT's generate: full recompute each step, context cropped to block_size."""
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


class ExportableGPT(nn.Module):
    """Flat-argument wrapper of `GPT.forward_cached`, the signature torch.export traces."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, past_length, logit_positions, *past):
        logits, new = self.gpt.forward_cached(input_ids, past_length, logit_positions, list(past))
        return (logits, *new)
