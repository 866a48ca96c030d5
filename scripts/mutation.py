"""Mutation check of the estimator and cotangent code: do the tests notice a planted bug?

Each mutant is one hand-written, plausible bug (a wrong sign, a dropped factor, an off-by-one,
a reused seed) in the hot spots: ``fisherlib/estimators/_fisher.py``, ``_products.py``,
``_estimate.py``, ``fisherlib/core/cotangents.py`` and the simplex / hypercube factor products.
Every mutant is applied to a fresh copy of the package and its tests in a temporary directory
(never to the working tree), and the estimator tests run against that copy; a mutant whose
tests still pass *survives*. Run before a release::

    .venv/bin/python scripts/mutation.py            # the committed tree (git HEAD)
    .venv/bin/python scripts/mutation.py --worktree  # the working tree as it is
    .venv/bin/python scripts/mutation.py -k stderr   # mutants whose name contains "stderr"
    .venv/bin/python scripts/mutation.py --file spectral  # mutants of files under fisherlib/spectral

Exit status 0 when every mutant is killed. A mutant whose text is no longer in the source
(the code moved) is reported as STALE: update its entry below. Results: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Fast, sharp tests first: with -x a killed mutant stops at its first failing test.
TESTS = ["tests/estimators/test_fisher.py", "tests/estimators/test_regressions.py",
         "tests/estimators/test_precision.py", "tests/estimators/test_matrix.py",
         "tests/estimators/test_moments.py", "tests/estimators/test_running.py", "tests/backends/test_torch_layers.py"]

# (name, file, text, replacement): the text must occur exactly once in the file.
MUTANTS = [
    # -- the driver
    ("batch seed ignores the batch", "fisherlib/estimators/_fisher.py",
     "return derive(seed, b, stream)", "return derive(seed, 0, stream)"),
    ("label range off by one", "fisherlib/estimators/_fisher.py", "(y >= C)", "(y > C)"),
    ("JAX labels unchecked again", "fisherlib/estimators/_fisher.py", "if is_eager(y):", "if is_eager(y) and not hasattr(y, 'at'):"),
    ("upper bound gets F's cotangent", "fisherlib/estimators/_fisher.py",
     'if opts["bound"] == "upper":', 'if opts["bound"] == "upper-not":'),
    ("lower bound draws one probe", "fisherlib/estimators/_fisher.py",
     '(K, n, opts["rank"])', '(K, n, 1)'),
    ("probe squares skipped in place", "fisherlib/estimators/_fisher.py", "        w *= w\n", "        w *= 1.0\n"),
    # -- the running estimate (training loop)
    ("running s without the K in its gain", "fisherlib/estimators/_running.py",
     "gain=len(rows) * unit / alpha", "gain=unit / alpha"),
    ("running unit never renormalised", "fisherlib/estimators/_running.py",
     "                    terms[k] *= self._unit", "                    terms[k] *= 1.0"),
    ("running EMA weight not on the probes", "fisherlib/estimators/_running.py",
     "hut *= self._scale(N)", "hut *= 1.0"),
    ("training loss cotangent without 1/N", "fisherlib/core/cotangents.py",
     "ct *= 1.0 / N if weights is None", "ct *= 1.0 if weights is None"),
    ("ignored outputs keep their probes", "fisherlib/core/cotangents.py", "        hut *= w[:, None]\n", "        hut *= 1.0\n"),
    ("one probe's factor adds p(√p·ξ)", "fisherlib/core/simplex.py", "        a -= p\n", "        a += p\n"),
    # -- products of gradients
    ("diag squares the batch sum", "fisherlib/estimators/_products.py",
     "out = [xp.sum(g * g, axis=1) for g in grads]", "out = [xp.sum(g, axis=1) ** 2 for g in grads]"),
    ("trace drops the square", "fisherlib/estimators/_products.py",
     "xp.reshape(g * g, (g.shape[0], -1))", "xp.reshape(xp.abs(g), (g.shape[0], -1))"),
    ("blocks transpose the wrong factor", "fisherlib/estimators/_products.py",
     "m = xp.matmul(u, xp.matrix_transpose(u))", "m = xp.matmul(u, xp.matrix_transpose(u[..., ::-1, :]))"),
    ("deterministic columns kept per probe", "fisherlib/estimators/_products.py",
     "out = [xp.sum(x, axis=0, keepdims=True) for x in out]", "out = [x[:1, ...] for x in out]"),
    # -- the estimate
    ("stderr without the 1/sqrt(K)", "fisherlib/estimators/_estimate.py",
     "xp.std(x, axis=0, correction=1) / math.sqrt(K)", "xp.std(x, axis=0, correction=1)"),
    ("stderr with ddof 0", "fisherlib/estimators/_estimate.py",
     "xp.std(x, axis=0, correction=1)", "xp.std(x, axis=0, correction=0)"),
    ("block stderr sqrt2 |F_ij| (the old bug)", "fisherlib/estimators/_estimate.py",
     "xp.sqrt(d[..., :, None] * d[..., None, :] + m * m)", "math.sqrt(2.0) * xp.abs(m)"),
    ("mean divides by N + 1", "fisherlib/estimators/_estimate.py",
     "1.0 / self.n_inputs if", "1.0 / (self.n_inputs + 1) if"),
    ("one-probe stderr is the value", "fisherlib/estimators/_estimate.py",
     "return math.sqrt(2.0) * xp.abs(m)", "return xp.abs(m)"),
    ("merge forgets the other's inputs", "fisherlib/estimators/_estimate.py",
     "n_inputs=self.n_inputs + other.n_inputs", "n_inputs=self.n_inputs"),
    # -- cotangents and factor products
    ("Hutchinson weight p instead of sqrt p", "fisherlib/core/simplex.py",
     "    sp = xp.sqrt(p)\n    sp *= 1.0 / xp.sqrt(total)\n", "    sp = p / total\n"),
    ("Hutchinson (K probes) drops the centring", "fisherlib/core/simplex.py",
     "    a -= p * xp.sum(a, axis=-1, keepdims=True)\n", "    a -= 0.0 * p\n"),
    ("sigmoid factor without the root", "fisherlib/core/hypercube.py",
     "xp.exp(0.5 * _log_dsigmoid(zw, xp=xp)) * xw", "xp.exp(_log_dsigmoid(zw, xp=xp)) * xw"),
    ("upper bound weight p", "fisherlib/core/cotangents.py",
     "namespace_of(z=z, xi=xi).sqrt(p) * xi", "p * xi"),
    ("lower bound weight lambda", "fisherlib/core/cotangents.py",
     "w = vec * xp.sqrt(xp.clip(lam, min=0.0))[..., None, :]", "w = vec * xp.clip(lam, min=0.0)[..., None, :]"),
    ("exact lower columns weight lambda", "fisherlib/core/cotangents.py",
     "full = xp.permute_dims(vec * xp.sqrt(xp.clip(lam, min=0.0))[..., None, :], (2, 0, 1))",
     "full = xp.permute_dims(vec * xp.clip(lam, min=0.0)[..., None, :], (2, 0, 1))"),
    ("exact sigmoid columns without the root", "fisherlib/core/cotangents.py",
     "s, p = xp.sqrt(hypercube.fim(zw)), None", "s, p = hypercube.fim(zw), None"),
    ("MC sigmoid samples 1 - sigma", "fisherlib/core/cotangents.py",
     "u < xp.exp(log_sigmoid(zw, xp=xp))", "u > xp.exp(log_sigmoid(zw, xp=xp))"),
    ("MC softmax samples shifted classes", "fisherlib/core/cotangents.py",
     "return xp.clip(idx, max=zw.shape[-1] - 1)", "return xp.clip(idx + 1, max=zw.shape[-1] - 1)"),
    ("residual without p", "fisherlib/core/cotangents.py",
     "return onehot - xp.exp(log_softmax(zw, xp=xp))", "return onehot - 0.5 * xp.exp(log_softmax(zw, xp=xp))"),
    ("sigmoid residual without sigma", "fisherlib/core/cotangents.py",
     "return xp.astype(y, zw.dtype) - xp.exp(log_sigmoid(zw, xp=xp))", "return xp.astype(y, zw.dtype) - 0.5"),
    ("closed-form logit-layer diagonal p, not p(1-p)", "fisherlib/core/cotangents.py",
     "p if bound == \"upper\" else p * (1.0 - p)", "p"),
    # -- layer rules (core/layers.py) and the per-example driver
    ("dense diagonal with x, not x squared", "fisherlib/core/layers.py",
     "x2 = xp.permute_dims(x[:, 0, ...] ** 2, (1, 0, 2))", "x2 = xp.permute_dims(x[:, 0, ...], (1, 0, 2))"),
    ("shared positions squared before summing", "fisherlib/core/layers.py",
     "out[\"bias\"] = xp.sum(g, axis=2)  # (V, n, G, O)", "out[\"bias\"] = xp.sum(g * g, axis=2)"),
    ("embedding rows ignore repeats", "fisherlib/core/layers.py",
     "c = g * xp.matmul(same[None, ...], g)", "c = g * g"),
    ("column chunks lose all but the last", "fisherlib/estimators/_products.py",
     "deferred[pos] = g2 if pos not in deferred else deferred[pos] + g2", "deferred[pos] = g2"),
    ("moments variance not divided by K", "fisherlib/estimators/_estimate.py",
     "ss / (K * (K - 1)) if K >= 2 else ss", "ss / (K - 1) if K >= 2 else ss"),
]

# Issue 23: the modules grown since (spectral, distributed, natural, uses), the running Fisher
# and more layer rules. Each of these runs only the tests of its module (a fifth entry), so that
# the check stays minutes long on two cores; the default TESTS above do not touch them.
SPECTRAL = ["tests/spectral/test_hardening.py", "tests/spectral/test_statistics.py",
            "tests/spectral/test_operator.py", "tests/spectral/test_learning_rate.py"]
DIST = ["tests/distributed/test_shard.py", "tests/distributed/test_jax_devices.py"]
NATURAL_TORCH = ["tests/natural/test_update_rules.py", "tests/natural/test_torch_optim.py"]
NATURAL_OPTAX = ["tests/natural/test_update_rules.py", "tests/natural/test_optax.py"]
USES = ["tests/uses/test_mutants.py", "tests/uses/test_functions.py"]
RUNNING = ["tests/estimators/test_running.py", "tests/natural/test_update_rules.py"]
LAYERS = ["tests/backends/test_torch_layers.py"]

MUTANTS += [
    # -- spectral: Lanczos
    ("Lanczos skips the reorthogonalisation", "fisherlib/spectral/_lanczos.py",
     "for _ in range(2):  # full reorthogonalisation, twice", "for _ in range(0):", SPECTRAL),
    ("block Lanczos stores R transposed", "fisherlib/spectral/_lanczos.py",
     "H[hi:hi + r, lo:hi] = R", "H[hi:hi + r, lo:hi] = R.T", SPECTRAL),
    ("Lanczos converges on the top pair only", "fisherlib/spectral/_lanczos.py",
     "S[lo:hi, ::-1][:, :k], axis=0)", "S[lo:hi, ::-1][:, :1], axis=0)", SPECTRAL),
    ("SLQ drops the three-term recurrence", "fisherlib/spectral/_lanczos.py",
     "W = W - a[:, None] * Q - b_prev[:, None] * Q_prev", "W = W - a[:, None] * Q", SPECTRAL),
    ("fisher_spectrum starts one vector for k pairs", "fisherlib/spectral/_summary.py",
     "start(seed, min(k, op.n_params))", "start(seed, 1)", SPECTRAL),
    # -- spectral: statistics, standard errors, normalisations
    ("SLQ weights without the square", "fisherlib/spectral/_density.py",
     "nodes[i, :L], weights[i, :L] = np.clip(theta, 0.0, None), S[0, :] ** 2",
     "nodes[i, :L], weights[i, :L] = np.clip(theta, 0.0, None), np.abs(S[0, :])", SPECTRAL),
    ("SLQ stderr with ddof 0", "fisherlib/spectral/_density.py",
     "se = float(np.std(per, ddof=1) / np.sqrt(len(per)))", "se = float(np.std(per, ddof=0) / np.sqrt(len(per)))",
     SPECTRAL),
    ("SLQ stderr without 1/sqrt(K)", "fisherlib/spectral/_density.py",
     "se = float(np.std(per, ddof=1) / np.sqrt(len(per)))", "se = float(np.std(per, ddof=1))", SPECTRAL),
    ("one-probe moment bound uses m_j, not m_2j", "fisherlib/spectral/_density.py",
     "2.0 * np.sum(self.weights * self.nodes ** (2 * j)) / self.n_params",
     "2.0 * np.sum(self.weights * self.nodes ** j) / self.n_params", SPECTRAL),
    ("trace error bar not scaled by P", "fisherlib/spectral/_summary.py",
     "trace=m1 * op.n_params, trace_stderr=se1 * op.n_params", "trace=m1 * op.n_params, trace_stderr=se1",
     SPECTRAL),
    ("exact density counts zeros per eigenvalue", "fisherlib/spectral/_density.py",
     "[(n_params - len(ev)) / n_params]", "[(n_params - len(ev)) / max(1, len(ev))]", SPECTRAL),
    ("exact rows of a mean scaled by 1/N, not 1/sqrt(N)", "fisherlib/spectral/_exact.py",
     "scale = 1.0 / n_total ** 0.5 if", "scale = 1.0 / n_total if", SPECTRAL),
    ("operator mean divides by N - 1", "fisherlib/spectral/_operator.py",
     "acc = acc / n_inputs", "acc = acc / (n_inputs - 1)", SPECTRAL),
    ("operator cache serves batch 0 for every batch", "fisherlib/spectral/_operator.py",
     "hit = self._cached.get(b)", "hit = self._cached.get(0)", SPECTRAL),
    # -- distributed: how batches are grouped across ranks and devices
    ("shard gives every rank rank 0's batches", "fisherlib/distributed/_torch.py",
     "itertools.islice(iter(self.batches), self.rank, None, self.world)",
     "itertools.islice(iter(self.batches), 0, None, self.world)", DIST),
    ("global batch index shared across ranks", "fisherlib/distributed/_torch.py",
     "itertools.count(rank, world) if batch_indices is None", "itertools.count(0, world) if batch_indices is None",
     DIST),
    ("all-reduced buffer split without advancing", "fisherlib/distributed/_torch.py",
     "        at += size\n        if isinstance(x, torch.Tensor):", "        if isinstance(x, torch.Tensor):", DIST),
    ("JAX groups reuse the first group's indices", "fisherlib/distributed/_jax.py",
     "groups.append((xs, ys, [idx[k] for k in full[g:g + D]]))", "groups.append((xs, ys, [idx[k] for k in full[0:D]]))",
     DIST),
    ("JAX groups ignore which batches fit", "fisherlib/distributed/_jax.py",
     "chunk = [items[k] for k in full[g:g + D]]", "chunk = items[g:g + D]", DIST),
    ("JAX inputs counted once per group", "fisherlib/distributed/_jax.py",
     "n_inputs += skeleton[0].n_inputs * xs.shape[0]", "n_inputs += skeleton[0].n_inputs", DIST),
    # -- natural gradient: the optimizers' update rules (torch and optax)
    ("torch KL clip without the square root", "fisherlib/natural/_torch_optim.py",
     "lr = lr * min(1.0, math.sqrt(self.kl_clip / (lr * lr * g_dot_d)))",
     "lr = lr * min(1.0, self.kl_clip / (lr * lr * g_dot_d))", NATURAL_TORCH),
    ("torch momentum buffer never decays", "fisherlib/natural/_torch_optim.py",
     "torch._foreach_mul_(bufs, group[\"momentum\"])", "torch._foreach_mul_(bufs, 1.0)", NATURAL_TORCH),
    ("torch weight decay with the wrong sign", "fisherlib/natural/_torch_optim.py",
     "grads = torch._foreach_add(grads, params, alpha=group[\"weight_decay\"])",
     "grads = torch._foreach_add(grads, params, alpha=-group[\"weight_decay\"])", NATURAL_TORCH),
    ("torch factorisation kept after a refresh", "fisherlib/natural/_torch_optim.py",
     "if plan is None or not plan.matches(self.curvature, self.damping):", "if plan is None:", NATURAL_TORCH),
    ("Levenberg-Marquardt model without the 1/2", "fisherlib/natural/_damping.py",
     "return -lr * (1.0 - lr / 2.0) * float(g_dot_direction)", "return -lr * (1.0 - lr) * float(g_dot_direction)",
     NATURAL_TORCH),
    ("optax KL clip without the square root", "fisherlib/natural/_optax.py",
     "lr = lr * jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.maximum(lr * lr * gd, 1e-30)))",
     "lr = lr * jnp.minimum(1.0, kl_clip / jnp.maximum(lr * lr * gd, 1e-30))", NATURAL_OPTAX),
    ("optax momentum never decays", "fisherlib/natural/_optax.py",
     "lambda m, x: momentum * m + x", "lambda m, x: m + x", NATURAL_OPTAX),
    ("optax refresh keeps the stale factors", "fisherlib/natural/_optax.py",
     "            factors = pre.arrays()\n", "            factors = state.factors\n", NATURAL_OPTAX),
    ("optax schedule frozen at step 0", "fisherlib/natural/_optax.py",
     "lr = lr_fn(state.count)", "lr = lr_fn(0)", NATURAL_OPTAX),
    # -- the running Fisher
    ("running EMA weights swapped", "fisherlib/estimators/_running.py",
     "else (float(decay), 1.0 - float(decay))", "else (1.0 - float(decay), float(decay))", RUNNING),
    ("running stderr without the square root", "fisherlib/estimators/_running.py",
     "out[k] = xp.sqrt(var * w2 / (safe * safe) / probes)", "out[k] = var * w2 / (safe * safe) / probes", RUNNING),
    ("running bias correction by W + 1", "fisherlib/estimators/_running.py",
     "scale = unit / (w + (w == 0))", "scale = unit / (w + 1)", RUNNING),
    # -- uses
    ("KL of quantization noise with 1/12, not 1/24", "fisherlib/uses/quantization.py",
     "total += step ** 2 / 24.0 * float(xp.sum(diag[name]))", "total += step ** 2 / 12.0 * float(xp.sum(diag[name]))",
     USES),
    ("bit allocation without the half", "fisherlib/uses/quantization.py",
     "half_log = {g: 0.5 * math.log2(w) if w > 0", "half_log = {g: math.log2(w) if w > 0", USES),
    ("quantizer levels off by one bit", "fisherlib/uses/quantization.py",
     "levels = float(2 ** (int(b) - 1) - 1)", "levels = float(2 ** int(b) - 1)", USES),
    ("layer score stderr with ddof 0", "fisherlib/uses/scores.py",
     "out[name] = float(xp.std(sums, correction=1)) / math.sqrt(K)",
     "out[name] = float(xp.std(sums, correction=0)) / math.sqrt(K)", USES),
    ("pruning saliency with |theta|, not theta squared", "fisherlib/uses/pruning.py",
     "scores = [0.5 * _trees.detach(t) ** 2 * d for t, d in zip(lv.arrays, diag)]",
     "scores = [0.5 * abs(_trees.detach(t)) * d for t, d in zip(lv.arrays, diag)]", USES),
    # -- layer rules
    ("layer-norm scale gradient without x", "fisherlib/core/layers.py",
     "out[\"scale\"] = xp.sum(g * x[None, ...], axis=2)", "out[\"scale\"] = xp.sum(g, axis=2)", LAYERS),
]


# -- issue 24 item 4: the Sophia-schedule Fisher preconditioner (torch and optax)
SOPHIA_TORCH = ["tests/natural/test_sophia.py"]
SOPHIA_OPTAX = ["tests/natural/test_sophia_optax.py"]
MUTANTS += [
    ("sophia h without the EMA's bias correction", "fisherlib/natural/_sophia.py",
     'scale = float(self.fisher._unit / (state["w"] + (state["w"] == 0)))', "scale = float(self.fisher._unit)",
     SOPHIA_TORCH),
    ("sophia clip at 2 lr", "fisherlib/natural/_sophia.py",
     "    torch._foreach_clamp_max_(den, 1.0)\n", "    torch._foreach_clamp_max_(den, 2.0)\n", SOPHIA_TORCH),
    ("sophia weight decay coupled (into m)", "fisherlib/natural/_sophia.py",
     "            if wd:\n                torch._foreach_mul_(ps, 1 - lr * wd)\n",
     "            if wd:\n                torch._foreach_add_(ms, ps, alpha=(1 - b1) * wd)\n", SOPHIA_TORCH),
    ("sophia refresh every step", "fisherlib/natural/_sophia.py",
     "return self.steps % self.refresh == 0", "return True", SOPHIA_TORCH),
    ("sophia probes reuse one seed", "fisherlib/natural/_sophia.py",
     "_step_seed(self.seed, self.refreshes)", "_step_seed(self.seed, 0)", SOPHIA_TORCH),
    ("sophia Fisher divided by the batch, not the counted positions", "fisherlib/natural/_sophia.py",
     "n = z.shape[0] if keep is None else int(keep.sum())", "n = z.shape[0]", SOPHIA_TORCH),
    ("sophia fisher_batch ignored", "fisherlib/natural/_sophia.py",
     "    if count is None:\n        return args, kwargs\n", "    if True:\n        return args, kwargs\n",
     SOPHIA_TORCH),
    ("sophia hook captures evaluation forwards", "fisherlib/natural/_sophia.py",
     " or not torch.is_grad_enabled() or", " or", SOPHIA_TORCH),
    ("sophia refreshes counter not checkpointed", "fisherlib/natural/_sophia.py",
     'self.steps, self.refreshes = int(extra["steps"]), int(extra["refreshes"])',
     'self.steps, self.refreshes = int(extra["steps"]), 0', SOPHIA_TORCH),
    ("optax sophia m without (1 - b1)", "fisherlib/natural/_sophia_optax.py",
     "lambda m, g: b1 * m + (1 - b1) * g", "lambda m, g: b1 * m + g", SOPHIA_OPTAX),
    ("optax sophia h from the Fisher's EMA with b1", "fisherlib/natural/_sophia_optax.py",
     "n, b2)", "n, b1)", SOPHIA_OPTAX),
    ("optax sophia floor added, not max", "fisherlib/natural/_sophia_optax.py",
     "jnp.maximum(gamma * h[\"diag:\" + name].astype(x.dtype), eps)", "(gamma * h[\"diag:\" + name].astype(x.dtype) + eps)",
     SOPHIA_OPTAX),
]

def _tests_of(mutant: tuple) -> list[str]:
    """The tests a mutant runs: its own selection (a fifth entry), else the estimator tests."""
    return list(mutant[4]) if len(mutant) > 4 else TESTS


def _copy(dest: Path, worktree: bool) -> None:
    paths = ["fisherlib", "tests", "docs", "pyproject.toml"]  # some tests read the docs' pages
    if worktree:
        for p in paths:
            src = ROOT / p
            (shutil.copytree(src, dest / p, ignore=shutil.ignore_patterns("__pycache__"))
             if src.is_dir() else shutil.copy2(src, dest / p))
        return
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", *paths], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def _pytest(where: Path, tests: list[str], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, FISHERLIB_TEST_BACKENDS="numpy", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = str(where)  # pytest also puts the copy's root first (rootdir conftest)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=where, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - t0, "timeout"
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.perf_counter() - t0, tail[-1] if tail else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not git HEAD")
    ap.add_argument("-k", default="", help="only mutants whose name contains this text")
    ap.add_argument("--file", default="", help="only mutants of files whose path contains this text")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m[0] and args.file in m[1]]
    with tempfile.TemporaryDirectory(prefix="fisherlib-mutation-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _copy(base, args.worktree)
        check = subprocess.run([sys.executable, "-c", "import fisherlib; print(fisherlib.__file__)"], cwd=base,
                               env=dict(os.environ, PYTHONPATH=str(base)), capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(base)):
            print(f"the copy is not the fisherlib that imports: {check.stdout or check.stderr}")
            return 2
        selections = []
        for m in chosen:
            sel = _tests_of(m)
            if sel not in selections:
                selections.append(sel)
        for sel in selections:  # every selection in use passes before any mutant
            rc, secs, last = _pytest(base, sel, args.timeout)
            print(f"unmutated ({len(sel)} files from {sel[0]}): {'pass' if rc == 0 else 'FAIL'} in {secs:.0f} s ({last})")
            if rc != 0:
                print("the tests fail without a mutant; fix that first")
                return 2
        survivors, stale = [], []
        print(f"{'mutant':50} {'file':34} {'result':9} {'s':>5}")
        for mutant in chosen:
            name, file, old, new = mutant[:4]
            work = Path(tmp) / "m"
            if work.exists():
                shutil.rmtree(work)
            shutil.copytree(base, work)
            path = work / file
            text = path.read_text()
            if text.count(old) != 1:
                stale.append(name)
                print(f"{name:50} {file.split('fisherlib/')[-1]:34} {'STALE':9} {'':>5}")
                continue
            path.write_text(text.replace(old, new))
            rc, secs, last = _pytest(work, _tests_of(mutant), args.timeout)
            result = "killed" if rc == 1 else "SURVIVED" if rc == 0 else f"error {rc}"
            if rc == 0:
                survivors.append(name)
            print(f"{name:50} {file.split('fisherlib/')[-1]:34} {result:9} {secs:5.0f}", flush=True)
        print(f"\n{len(chosen) - len(survivors) - len(stale)} of {len(chosen)} mutants killed; "
              f"survivors: {survivors or 'none'}; stale: {stale or 'none'}")
        return 1 if survivors or stale else 0


if __name__ == "__main__":
    sys.exit(main())
