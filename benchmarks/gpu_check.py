"""`make gpu-check`: on a machine with an NVIDIA GPU, the GPU tests, then the CUDA benchmarks
and the accuracy table, in under 8 minutes; the CSVs go to benchmarks/results (or --out).

1. tests: every loss on CUDA against the same call on the CPU (tests/test_cuda.py), the
   Triton kernels compiled and run on CUDA (tests/test_triton.py), and the accuracy tests
   where they have CUDA cases;
2. accuracy: the cross-entropy gradient's error against float64 where p_y is near 1, and
   linear cross-entropy's dh and dW, for torch, losskit and (when installed) Liger-Kernel
   and cut-cross-entropy -> accuracy-cuda.csv;
3. speed and memory: `losskit bench --device cuda` at the headline shapes (cross-entropy
   N=8192, C=131072; BCE 8192 x 4096; linear cross-entropy N=8192, H=4096, C=131072; all
   bfloat16), Liger, CCE and torch.compile beside losskit -> bench-cuda.csv.

Each stage has its own time limit, so that one slow stage cannot starve the others.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stage(title: str, command: list[str], limit: float, log: Path) -> int:
    print(f"\n== {title} (limit {limit:.0f} s)", flush=True)
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n== {title}\n$ {' '.join(command)}\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=limit)
            code = done.returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n!! timed out after {limit:.0f} s\n")
            code = 124
    print(f"   exit {code} after {time.perf_counter() - start:.0f} s; log: {log}", flush=True)
    return code


def accuracy(out_csv: Path) -> None:
    """Error against float64 on the same (rounded) inputs, on CUDA, per provider."""
    import torch
    import torch.nn.functional as F

    import losskit.functional as LF

    providers = {"torch": F.cross_entropy, "losskit": LF.cross_entropy}
    lce = {"torch": lambda h, w, t: F.cross_entropy(h @ w.T, t), "losskit": LF.linear_cross_entropy}
    if importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

        providers["liger"] = LigerCrossEntropyLoss()
        liger_lce = LigerFusedLinearCrossEntropyLoss()
        lce["liger"] = lambda h, w, t: liger_lce(w, h, t)
    if importlib.util.find_spec("cut_cross_entropy"):
        from cut_cross_entropy import linear_cross_entropy as cce

        lce["cce"] = lambda h, w, t: cce(h, w, t)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return float(((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item())

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for vocab in (32768, 131072):
            for confidence in (0.9, 0.999, 0.9999):
                n = 256
                x = torch.randn(n, vocab, device="cuda", generator=g) * 0.1
                t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
                others = torch.logsumexp(x.scatter(1, t[:, None], -math.inf), 1)
                x.scatter_(1, t[:, None], (others + math.log(confidence / (1 - confidence)))[:, None])
                x = x.to(dtype)
                x64 = x.double().requires_grad_()
                F.cross_entropy(x64, t).backward()
                want_target = x64.grad.gather(1, t[:, None])
                for name, fn in providers.items():
                    xi = x.clone().requires_grad_()
                    try:
                        fn(xi, t).backward()
                    except Exception as error:  # a provider that refuses a dtype is reported, not fatal
                        print(f"   accuracy: {name} {dtype} failed: {error}", flush=True)
                        continue
                    rows.append({"op": "ce", "provider": name, "dtype": str(dtype).split(".")[1], "vocab": vocab,
                                 "confidence": confidence, "quantity": "dlogits[target]",
                                 "max_rel_error": rel(xi.grad.gather(1, t[:, None]), want_target),
                                 "unit_roundoff": torch.finfo(dtype).eps / 2})
    for dtype in (torch.bfloat16,):
        n, h, vocab = 4096, 1024, 65536
        hidden = (torch.randn(n, h, device="cuda", generator=g)).to(dtype)
        weight = (torch.randn(vocab, h, device="cuda", generator=g) * 0.02).to(dtype)
        t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        F.cross_entropy(h64 @ w64.T, t).backward()
        for name, fn in lce.items():
            hi, wi = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            try:
                fn(hi, wi, t).backward()
            except Exception as error:
                print(f"   accuracy: {name} lce failed: {error}", flush=True)
                continue
            for quantity, got, want in (("dh", hi.grad, h64.grad), ("dW", wi.grad, w64.grad)):
                rows.append({"op": "lce", "provider": name, "dtype": "bfloat16", "vocab": vocab, "confidence": "",
                             "quantity": quantity, "max_rel_error": rel(got, want),
                             "unit_roundoff": torch.finfo(dtype).eps / 2})
    n, h, vocab = 4096, 1024, 65536  # linear log-probs under a per-token upstream gradient
    hidden = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(vocab, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    upstream = torch.randn(n, device="cuda", generator=g)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ((h64 @ w64.T).log_softmax(-1).gather(1, t[:, None]).squeeze(1) * upstream).sum().backward()
    llp = {"torch": lambda h, w, t: (h @ w.T).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1),
           "losskit": LF.linear_log_probs}
    for name, fn in llp.items():
        hi, wi = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (fn(hi, wi, t) * upstream).sum().backward()
        for quantity, got, want in (("dh", hi.grad, h64.grad), ("dW", wi.grad, w64.grad)):
            rows.append({"op": "llp", "provider": name, "dtype": "bfloat16", "vocab": vocab, "confidence": "",
                         "quantity": quantity, "max_rel_error": rel(got, want),
                         "unit_roundoff": torch.finfo(torch.bfloat16).eps / 2})
    with out_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"   {row['op']:4} {row['provider']:8} {row['dtype']:9} V={row['vocab']:<7} p_y={row['confidence']!s:7}"
              f" {row['quantity']:16} {row['max_rel_error']:.2e}", flush=True)


def tune(out_csv: Path) -> None:
    """The Triton cross-entropy kernel's block of columns and warps per row, timed at the
    headline shape (N=8192, C=131072, bfloat16, loss and gradient): rows to tune.csv."""
    import torch
    import triton.testing

    import losskit.functional as LF
    from losskit.kernels import triton_cross_entropy as kernel

    x = torch.randn(8192, 131072, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, 131072, (8192,), device="cuda")
    saved = kernel.BLOCK, kernel.NUM_WARPS
    rows = []
    try:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                kernel.BLOCK, kernel.NUM_WARPS = block, warps
                xi = x.clone().requires_grad_()

                def step():
                    LF.cross_entropy(xi, target).backward()
                    xi.grad = None

                ms = triton.testing.do_bench(step, warmup=5, rep=60)
                rows.append({"block": block, "num_warps": warps, "ms": ms,
                             "gb_per_s": 3 * x.numel() * 2 / ms / 1e6})  # 2 reads + 1 write of bf16
                print(f"   BLOCK={block:5} num_warps={warps:2}: {ms:.3f} ms", flush=True)
    finally:
        kernel.BLOCK, kernel.NUM_WARPS = saved
    with out_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--skip", action="append", default=[], choices=["tests", "accuracy", "bench"])
    parser.add_argument("--tune", action="store_true", help="also time the cross-entropy kernel's block and warps")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("make gpu-check: no CUDA device here (torch.cuda.is_available() is False)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu-check.log"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"liger: {bool(importlib.util.find_spec('liger_kernel'))}, cce: {bool(importlib.util.find_spec('cut_cross_entropy'))}",
          flush=True)
    codes = {}
    env_python = [sys.executable]
    if "tests" not in args.skip:
        tests = ["tests/test_cuda.py", "tests/test_triton.py", "tests/test_linear_log_probs.py::test_triton_kernels_equal_the_torch_ops"]
        tests = [t for t in tests if (ROOT / t.split("::")[0]).exists()]
        codes["tests"] = _stage("GPU tests", env_python + ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                             "-o", "addopts=", *tests], 170, log)
    if "accuracy" not in args.skip:
        print("\n== accuracy against float64", flush=True)
        start = time.perf_counter()
        try:
            accuracy(args.out / "accuracy-cuda.csv")
            codes["accuracy"] = 0
        except Exception as error:
            print(f"   accuracy failed: {type(error).__name__}: {error}", flush=True)
            codes["accuracy"] = 1
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    if args.tune:
        print("\n== tuning the Triton cross-entropy kernel", flush=True)
        try:
            tune(args.out / "tune-cuda.csv")
            codes["tune"] = 0
        except Exception as error:
            print(f"   tune failed: {type(error).__name__}: {error}", flush=True)
            codes["tune"] = 1
    if "bench" not in args.skip:
        codes["bench"] = _stage("losskit bench --device cuda (headline shapes)",
                                env_python + ["-m", "losskit", "bench", "--device", "cuda", "--heads",
                                              "--no-progress", "--out", str(args.out)], 240, log)
    print(f"\nmake gpu-check: {codes}", flush=True)
    return 0 if not any(codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
