"""``fisherlib fisher``: the Fisher of a model over a dataset, written to a file.

The model is a HuggingFace model directory (``config.json`` beside the weights and a tokenizer,
what ``save_pretrained`` writes) or an importable torch module, ``package.module:name``, where
``name`` is an ``nn.Module`` or a callable that returns one. The data:

- for a HuggingFace model: a text file, one input a line (``.txt``), or a table with a text
  column and optionally a label column (``.jsonl``, ``.csv``, ``.tsv``);
- for a torch module: a ``.npz`` or ``.safetensors`` file with an ``x`` array of inputs (first
  axis: inputs) and optionally ``y`` labels;
- for either: ``package.module:name``, an iterable of batches (or a callable returning one) as
  :func:`fisherlib.fisher` takes them.

Nothing is downloaded: the model is read from disk (``local_files_only``).
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import time
from typing import Any


def load_object(spec: str, what: str) -> Any:
    """``package.module:name`` imported (``name`` may be dotted); a callable is not called here."""
    if ":" not in spec:
        raise ValueError(f"{what}: expected a path or 'package.module:name', got {spec!r}")
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import module {mod!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str):
    """(model in eval mode, tokenizer or None, whether it is a causal language model)."""
    import torch

    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ValueError(f"model: directory {spec!r} has no config.json (a HuggingFace model "
                             "directory, as save_pretrained writes it)")
        import transformers

        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(spec, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.eval(), tokenizer, causal
    obj = load_object(spec, "model")
    if not isinstance(obj, torch.nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(f"model: {spec!r} is not a torch.nn.Module (nor a callable returning one), "
                        f"got {type(obj).__name__}")
    return obj.eval(), None, False


def _read_table(path: str, text_column: str, label_column: str) -> tuple[list[str], list | None]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()], None
    if ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    else:
        raise ValueError(f"data: expected a .txt, .jsonl, .csv or .tsv file for a HuggingFace model, got {path!r}")
    if not rows:
        raise ValueError(f"data: {path!r} has no rows")
    if text_column not in rows[0]:
        raise ValueError(f"data: {path!r} has no column {text_column!r} (columns: {sorted(rows[0])}); "
                         "name it with --text-column")
    texts = [str(r[text_column]) for r in rows]
    labels = [int(r[label_column]) for r in rows] if label_column in rows[0] else None
    return texts, labels


def text_batches(path: str, tokenizer, *, batch_size: int, max_length: int, limit: int | None,
                 text_column: str = "text", label_column: str = "label", causal: bool = False) -> list:
    import torch

    texts, labels = _read_table(path, text_column, label_column)
    if limit is not None:
        texts, labels = texts[:limit], (labels[:limit] if labels is not None else None)
    out = []
    for i in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt"))
        if causal:  # the next token is the label of each position; padding and the last are ignored
            ids = batch["input_ids"]
            y = torch.full_like(ids, -100)
            y[:, :-1] = torch.where(batch["attention_mask"][:, 1:] > 0, ids[:, 1:], -100)
            batch["labels"] = y
        elif labels is not None:
            batch["labels"] = torch.as_tensor(labels[i:i + batch_size])
        out.append(batch)
    return out


def array_batches(path: str, *, batch_size: int, limit: int | None) -> list:
    import numpy as np
    import torch

    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    elif ext == ".safetensors":
        import safetensors.numpy

        arrays = safetensors.numpy.load_file(path)
    else:
        raise ValueError(f"data: expected a .npz or .safetensors file with an 'x' array for a torch module, got {path!r}")
    if "x" not in arrays:
        raise ValueError(f"data: {path!r} has no array named 'x' (it has {sorted(arrays)})")
    x = torch.as_tensor(arrays["x"])
    y = torch.as_tensor(arrays["y"]) if "y" in arrays else None
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    xs = x.split(batch_size)
    return [(a, b) for a, b in zip(xs, y.split(batch_size))] if y is not None else list(xs)


def run(args) -> int:
    """The ``fisherlib fisher`` command (arguments: :func:`fisherlib.cli.build_parser`)."""
    import fisherlib

    model, tokenizer, causal = load_model(args.model)
    if args.dtype == "float64":
        model = model.double()
    if args.data.endswith((".npz", ".safetensors")) and os.path.exists(args.data):
        batches = array_batches(args.data, batch_size=args.batch_size, limit=args.max_inputs)
    elif os.path.exists(args.data):
        if tokenizer is None:
            raise ValueError(f"data: {args.data!r} is a text file, which needs a HuggingFace model "
                             "directory (with its tokenizer)")
        batches = text_batches(args.data, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                               limit=args.max_inputs, text_column=args.text_column,
                               label_column=args.label_column, causal=causal)
    else:
        obj = load_object(args.data, "data")
        batches = obj() if callable(obj) and not hasattr(obj, "__iter__") else obj
    if args.dtype == "float64":
        batches = [_double(b) for b in batches]
    t0 = time.perf_counter()
    kron = {} if args.structure == "diag" else {"structure": args.structure, "kfac_approx": args.kfac_approx}
    est = fisherlib.fisher(model, None, batches, method=args.method, probes=args.probes, seed=args.seed,
                           reduction=args.reduction, progress=not args.no_progress, **kron)
    seconds = time.perf_counter() - t0
    out = args.out
    est.save(out)
    if not out.endswith((".safetensors", ".npz")):
        out += ".npz"
    total = sum(float(v.sum()) for v in est.value.values()) if hasattr(est.value, "values") else float("nan")
    what = "diag F" if args.structure == "diag" else f"{args.structure.upper()} F ({len(est.blocks)} layers)"
    print(f"fisherlib fisher: {est.method} {what} over {est.n_inputs} inputs ({est.n_outputs} outputs), "
          f"{len(est.names)} parameter tensors, trace {total:.6g}, {seconds:.1f} s -> {out}")
    return 0


def _double(batch):
    import torch

    def cast(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if isinstance(batch, dict):
        return {k: cast(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(cast(t) for t in batch)
    return cast(batch)
