"""`losskit bench accuracy`: each path's error against float64 on the same inputs.

The inputs are the hard case of cross-entropy: confident rows. Each row's other logits are
N(0, 0.1) and the target's is set so that p_y = confidence (in float64, before the logits
are rounded to the dtype under test; the float64 oracle then sees exactly the rounded
logits). A confident row's gradient at the target, coef (p_y - 1), is small next to p_y,
so a float32 softmax whose total drops the tiny terms gets it wrong (see
:mod:`losskit.kernels.rows`).

An error is counted in *roundings* of the output dtype: for each element,

    |got - exact| / (u |exact| + eta)

with u the dtype's unit roundoff (2^-8 bfloat16, 2^-11 float16, 2^-24 float32) and eta
half its smallest subnormal; rounding the exact value once into the dtype costs at most
1. Elementwise for the loss per token and the logits' gradient; normwise (the Frobenius
norm of the error over u times that of the exact value, plus eta sqrt(n)) for linear
cross-entropy's
input and weight gradients, which are sums over classes or rows.

Rows go to ``benchmarks/results/accuracy.csv`` and a chart beside it.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

CSV_FIELDS = ["op", "provider", "dtype", "vocab", "confidence", "chunks", "metric", "roundings", "max_rel_error",
              "note", "torch", "timestamp"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: half the gap between 1 and the next number of the dtype."""
    return torch.finfo(dtype).eps / 2


def roundings(got: Tensor, exact: Tensor, dtype: torch.dtype) -> float:
    """The largest elementwise error of ``got`` against ``exact`` (float64), in roundings
    of ``dtype``: |got - exact| / (u |exact| + eta), eta half the smallest subnormal."""
    exact = exact.double()
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2  # half the subnormal gap
    err = (got.double() - exact).abs() / (unit_roundoff(dtype) * exact.abs() + floor)
    return float(err.max()) if err.numel() else 0.0


def norm_roundings(got: Tensor, exact: Tensor, dtype: torch.dtype) -> float:
    """||got - exact|| / (u ||exact|| + eta sqrt(n)): the normwise error in roundings of the
    dtype (rounding each element once costs at most 1, subnormals included)."""
    exact = exact.double()
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
    scale = unit_roundoff(dtype) * exact.norm() + floor * math.sqrt(exact.numel())
    return float((got.double() - exact).norm() / scale)


def max_rel_error(got: Tensor, exact: Tensor) -> float:
    exact = exact.double()
    return float(((got.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max())


def confident_logits(n: int, vocab: int, confidence: float, dtype: torch.dtype, seed: int = 0,
                     wrong: bool = False) -> tuple[Tensor, Tensor]:
    """(logits (n, vocab) in ``dtype``, targets (n,)): other logits N(0, 0.1), the target's
    (or, with ``wrong``, another class's) set so that its probability is ``confidence``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 0.1
    target = torch.randint(0, vocab, (n,), generator=gen)
    peak = (target + 1) % vocab if wrong else target
    others = torch.logsumexp(x.scatter(1, peak[:, None], -math.inf), 1)
    x.scatter_(1, peak[:, None], (others + math.log(confidence / (1 - confidence)))[:, None])
    return x.to(dtype), target


def exact_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(per-token loss, dloss/dlogits of the 'mean' loss) in float64: the oracle."""
    x = logits.double().requires_grad_()
    F.cross_entropy(x, target).backward()
    with torch.no_grad():
        per_token = F.cross_entropy(x, target, reduction="none")
    return per_token, x.grad


def cross_entropy_paths() -> dict[str, Callable[[Tensor, Tensor, str], Tensor]]:
    """The cross-entropy providers: ``fn(logits, target, reduction)``."""
    import losskit.functional as LF
    from losskit.kernels import reference_only

    def reference(x, t, reduction):
        with reference_only():
            return LF.cross_entropy(x, t, reduction=reduction)

    return {"torch": lambda x, t, r: F.cross_entropy(x, t, reduction=r),
            "losskit": lambda x, t, r: LF.cross_entropy(x, t, reduction=r),
            "losskit reference": reference}


def measure(fn: Callable, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(per-token loss, dlogits of the 'mean' loss) of a provider, in the logits' dtype."""
    x = logits.clone().requires_grad_()
    fn(x, target, "mean").backward()
    with torch.no_grad():
        per_token = fn(logits, target, "none")
    return per_token, x.grad


def _triton(fn: Callable) -> Callable:
    """``fn`` with losskit's Triton kernel serving CPU tensors (Triton's interpreter)."""
    from losskit._core import switches

    def run(x, t, r):
        with switches.triton_on_cpu():
            return fn(x, t, r)
    return run


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _liger_ce() -> Callable | str:
    """Liger's cross-entropy (Triton), or why it cannot run here."""
    if not _interpreted():
        return "needs TRITON_INTERPRET=1 on CPU"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as error:  # noqa: BLE001 - whatever stops the import is the note
        return f"not importable: {type(error).__name__}"
    return lambda x, t, r: liger_cross_entropy(x, t, reduction=r)


def _chunk_sizes(n: int, chunks: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(c, max(1, n // c)) for c in chunks if n // c >= 1]


def linear_inputs(n: int, hidden: int, vocab: int, confidence: float, dtype: torch.dtype,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(h (n, hidden), W (vocab, hidden), targets): random W, each h pushed along its
    target's row so that p_y is about ``confidence`` (exact in float64 before rounding)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    h = torch.randn(n, hidden, generator=gen, dtype=torch.float64) * 0.3
    target = torch.randint(0, vocab, (n,), generator=gen)
    for _ in range(3):  # a few Newton-free corrections: z_y - logsumexp(others) -> logit(confidence)
        z = h @ w.T
        others = torch.logsumexp(z.scatter(1, target[:, None], -math.inf), 1)
        need = math.log(confidence / (1 - confidence)) - (z.gather(1, target[:, None]).squeeze(1) - others)
        wy = w[target]
        h = h + (need / wy.square().sum(1))[:, None] * wy
    return h.to(dtype), w.to(dtype), target


def exact_linear(h: Tensor, w: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(per-token loss, dh, dW) of the 'mean' loss in float64."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, target).backward()
    with torch.no_grad():
        per_token = F.cross_entropy(h64 @ w64.T, target, reduction="none")
    return per_token, h64.grad, w64.grad


def linear_paths(chunk_size: int) -> dict[str, Callable]:
    import losskit.functional as LF

    return {
        "torch": lambda h, w, t, r: F.cross_entropy(F.linear(h, w), t, reduction=r),
        "losskit": lambda h, w, t, r: LF.linear_cross_entropy(h, w, t, reduction=r, chunk_size=chunk_size),
    }


def _liger_lce(chunk_size: int) -> Callable | str:
    if not _interpreted():
        return "needs TRITON_INTERPRET=1 on CPU"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as error:  # noqa: BLE001
        return f"not importable: {type(error).__name__}"
    return lambda h, w, t, r: liger_fused_linear_cross_entropy(h, w, t, reduction=r)


def measure_linear(fn: Callable, h: Tensor, w: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    fn(hh, ww, target, "mean").backward()
    with torch.no_grad():
        per_token = fn(h, w, target, "none")
    return per_token, hh.grad, ww.grad


def plan(quick: bool) -> dict:
    """The sweep: (rows, vocabularies, confidences, dtypes), and linear CE's chunk counts."""
    if quick:
        return dict(rows=8, vocabs=(1024, 32768), confidences=(0.5, 0.99, 0.9999), dtypes=tuple(DTYPES),
                    triton_vocabs=(1024,), linear=dict(n=64, hidden=32, vocab=2048, chunks=(1, 8),
                                                       confidences=(0.5, 0.999)))
    return dict(rows=32, vocabs=(4096, 32768, 131072), confidences=(0.5, 0.9, 0.99, 0.999, 0.9999),
                dtypes=tuple(DTYPES), triton_vocabs=(4096,),
                linear=dict(n=512, hidden=64, vocab=8192, chunks=(1, 8, 64), confidences=(0.5, 0.99, 0.999)))


def rows(quick: bool) -> Iterator[dict]:
    """Every measurement of the sweep, as CSV rows (without the stamp)."""
    spec = plan(quick)
    paths = cross_entropy_paths()
    for dtype_name in spec["dtypes"]:
        dtype = DTYPES[dtype_name]
        for vocab in spec["vocabs"]:
            providers: dict[str, Callable | str] = dict(paths)
            if vocab in spec["triton_vocabs"]:
                providers["losskit triton"] = (_triton(paths["losskit"]) if _interpreted()
                                               else "needs TRITON_INTERPRET=1 on CPU")
                providers["liger"] = _liger_ce()
            for confidence in spec["confidences"]:
                n = spec["rows"] if vocab <= 32768 else 4
                logits, target = confident_logits(n, vocab, confidence, dtype)
                loss64, grad64 = exact_cross_entropy(logits, target)
                for provider, fn in providers.items():
                    base = dict(op="cross_entropy", provider=provider, dtype=dtype_name, vocab=vocab,
                                confidence=confidence, chunks=1)
                    if isinstance(fn, str):
                        yield dict(base, metric="dlogits", roundings="", max_rel_error="", note=fn)
                        continue
                    loss, grad = measure(fn, logits, target)
                    yield dict(base, metric="loss", roundings=roundings(loss, loss64, dtype),
                               max_rel_error=max_rel_error(loss, loss64), note="per token")
                    yield dict(base, metric="dlogits", roundings=roundings(grad, grad64, dtype),
                               max_rel_error=max_rel_error(grad, grad64), note="")
    lin = spec["linear"]
    for dtype_name in spec["dtypes"]:
        dtype = DTYPES[dtype_name]
        for confidence in lin["confidences"]:
            h, w, target = linear_inputs(lin["n"], lin["hidden"], lin["vocab"], confidence, dtype)
            loss64, dh64, dw64 = exact_linear(h, w, target)
            for chunks, chunk_size in _chunk_sizes(lin["n"], lin["chunks"]):
                providers = dict(linear_paths(chunk_size))
                if chunks > 1:  # torch has no chunks, Liger picks its own: each measured once, at chunks=1
                    providers.pop("torch")
                else:
                    providers["liger"] = _liger_lce(chunk_size)
                for provider, fn in providers.items():
                    base = dict(op="linear_cross_entropy", provider=provider, dtype=dtype_name, vocab=lin["vocab"],
                                confidence=confidence, chunks=chunks)
                    if isinstance(fn, str):
                        yield dict(base, metric="dW", roundings="", max_rel_error="", note=fn)
                        continue
                    loss, dh, dw = measure_linear(fn, h, w, target)
                    yield dict(base, metric="loss", roundings=roundings(loss, loss64, dtype),
                               max_rel_error=max_rel_error(loss, loss64), note="per token")
                    for metric, got, exact in (("dh", dh, dh64), ("dW", dw, dw64)):
                        yield dict(base, metric=metric, roundings=norm_roundings(got, exact, dtype),
                                   max_rel_error=max_rel_error(got, exact), note="normwise")


def run(quick: bool, out_dir: Path, progress: bool = True) -> Path:
    """Measure, write ``accuracy.csv`` (``accuracy-quick.csv`` with --quick) and its chart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / ("accuracy-quick.csv" if quick else "accuracy.csv")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        for row in rows(quick):
            row = dict(row, torch=torch.__version__, timestamp=stamp)
            for key in ("roundings", "max_rel_error"):
                if isinstance(row[key], float):
                    row[key] = f"{row[key]:.4g}"
            writer.writerow(row)
            if progress:
                print(f"{row['op']:<21} {row['provider']:<18} {row['dtype']:<9} V={row['vocab']:<7} "
                      f"p={row['confidence']:<7} chunks={row['chunks']:<3} {row['metric']:<8} "
                      f"{row['roundings'] or row['note']}", flush=True)
    try:
        draw(csv_path, out_dir)
    except ImportError:
        print("losskit bench accuracy: matplotlib is not installed, no chart drawn")
    return csv_path


def draw(csv_path: Path, out_dir: Path) -> list[Path]:
    """accuracy_dlogits.png: dlogits error (roundings, log scale) against confidence at the
    largest vocabulary, one panel per dtype; accuracy_dW.png: linear CE's weight gradient
    against the chunk count."""
    from matplotlib.figure import Figure

    with csv_path.open() as handle:
        table = [r for r in csv.DictReader(handle) if r["roundings"]]
    paths = []
    ce = [r for r in table if r["op"] == "cross_entropy" and r["metric"] == "dlogits"]
    if ce:
        vocab = max(int(r["vocab"]) for r in ce)
        dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in ce)]
        fig = Figure(figsize=(4.5 * len(dtypes), 4), dpi=100)
        for ax, dtype in zip(fig.subplots(1, len(dtypes), squeeze=False)[0], dtypes):
            for provider in sorted({r["provider"] for r in ce}):
                pts = sorted((float(r["confidence"]), float(r["roundings"])) for r in ce
                             if r["provider"] == provider and r["dtype"] == dtype and int(r["vocab"]) == vocab)
                if pts:
                    ax.plot([-math.log10(1 - c) for c, _ in pts], [max(v, 1e-2) for _, v in pts], marker="o",
                            label=provider)
            ax.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="two roundings")
            ax.set(yscale="log", title=f"{dtype}, V={vocab}", xlabel="-log10(1 - p_y)",
                   ylabel="dlogits error (roundings of the dtype)")
            ax.legend(fontsize=7)
        path = out_dir / "accuracy_dlogits.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    lin = [r for r in table if r["op"] == "linear_cross_entropy" and r["metric"] == "dW"]
    if lin:
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        confidence = max(float(r["confidence"]) for r in lin)
        for provider in sorted({r["provider"] for r in lin}):
            for dtype in DTYPES:
                pts = sorted((int(r["chunks"]), float(r["roundings"])) for r in lin if r["provider"] == provider
                             and r["dtype"] == dtype and float(r["confidence"]) == confidence)
                if pts:
                    ax.plot([c for c, _ in pts], [max(v, 1e-2) for _, v in pts], marker="o", label=f"{provider} {dtype}")
        ax.set(xscale="log", yscale="log", xlabel="chunks", ylabel="dW error (normwise, roundings)",
               title=f"linear_cross_entropy weight gradient, p_y = {confidence}")
        ax.legend(fontsize=7)
        path = out_dir / "accuracy_dW.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths
