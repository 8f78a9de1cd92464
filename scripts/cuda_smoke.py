"""Every CUDA op, forward and backward: a quick smoke run (small shapes, meant to run under
compute-sanitizer) or a timing table against eager PyTorch.

    python scripts/cuda_smoke.py                                   # smoke: all raw ops and public ops
    compute-sanitizer --tool memcheck python scripts/cuda_smoke.py # the same under memcheck
    python scripts/cuda_smoke.py --bench                           # N=16384, H=4096, V=128256, bf16
    python scripts/cuda_smoke.py --bench --n 8192 --v 32000 --reps 7 --json results.json

Needs a GPU and lpc_kernels._C built with the CUDA torch (python setup.py build_ext --inplace).
The smoke run exits non-zero if an op fails, returns a non-finite value, or disagrees with the reference
backend beyond a loose tolerance (the exact checks are in tests/ops and tests/backends/test_cuda_kernels.py).
Timing: CUDA events around each call, median of --reps runs after --warmup runs; peak memory is
torch.cuda.max_memory_allocated above what was allocated before the call. "eager" is plain PyTorch:
log_softmax(logits.float()) + gather for the log-prob ops (linear: bf16 matmul first), the reference
backend for gumbel_softmax_codes (same Philox noise; "eager-rng" uses torch's RNG and
F.gumbel_softmax) and for preference_loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lpc_kernels as lk  # noqa: E402
from lpc_kernels.backends import unavailable_reason  # noqa: E402

OPS = torch.ops.lpc
DEV = torch.device("cuda")


def _check(name, ours, ref, rtol, atol):
    ours, ref = ours.detach().double(), ref.detach().double()
    if not torch.isfinite(ours).all():
        raise AssertionError(f"{name}: non-finite values")
    if not torch.allclose(ours, ref, rtol=rtol, atol=atol):
        err = (ours - ref).abs().max().item()
        raise AssertionError(f"{name}: max abs error {err:.3e} vs the reference backend")
    print(f"ok  {name}")


def _grads(fn, inputs, backend, cotangents):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in inputs]
    outs = fn(*leaves, backend=backend)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    torch.autograd.backward([o for o in outs], [c.to(o.dtype) for o, c in zip(outs, cotangents)])
    return [o.detach() for o in outs], [t.grad if t is not None and t.requires_grad else None for t in leaves]


def smoke():
    torch.manual_seed(0)
    # ---------------------------------------------------------------------------- token_logprobs
    for dtype, (n, v) in [(torch.float32, (5, 1000)), (torch.bfloat16, (3, 32003)), (torch.float16, (4, 77)),
                          (torch.float64, (2, 300))]:
        x = (torch.randn(n, v, device=DEV) * 3).to(dtype)
        lab = torch.randint(0, v, (n,), device=DEV)
        lab[0] = -100
        g = torch.randn(n, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        fn = lambda x, backend: lk.token_logprobs(x, lab, backend=backend)  # noqa: E731
        (o,), (gx,) = _grads(fn, [x], "cuda", [g])
        (r,), (rx,) = _grads(fn, [x.double()], "reference", [g])
        _check(f"token_logprobs fwd {dtype} {n}x{v}", o, r, 1e-4, 1e-4)
        _check(f"token_logprobs bwd {dtype} {n}x{v}", gx, rx, 2e-2, 1e-4)
        lse = OPS.token_logprobs_fwd(x, lab, -100)[1]
        buf = x.clone()
        OPS.token_logprobs_bwd_(g, buf, lab, lse, -100)
        _check(f"token_logprobs bwd_ (in place) {dtype}", buf, gx, 1e-2, 1e-4)
    flat = torch.randn(6 * 777 + 3, device=DEV)  # misaligned rows (scalar head/tail, vector middle)
    x = flat[3:].view(6, 777)
    lab = torch.randint(0, 777, (6,), device=DEV)
    logp, lse = OPS.token_logprobs_fwd(x, lab, -100)
    _check("token_logprobs fwd misaligned", logp, lk.token_logprobs(x, lab, backend="reference"), 1e-5, 1e-5)
    gx = OPS.token_logprobs_bwd(torch.ones(6, device=DEV), x, lab, lse, -100)
    OPS.token_logprobs_bwd_(torch.ones(6, device=DEV), x, lab, lse, -100)
    _check("token_logprobs bwd misaligned (scalar and in place)", x, gx, 1e-5, 1e-6)

    # ---------------------------------------------------------------------- linear_token_logprobs
    for dtype, (n, h, v, chunk), with_bias in [(torch.float32, (11, 24, 2500, 1), True),
                                               (torch.bfloat16, (40, 64, 1000, 4), False),
                                               (torch.float16, (200, 32, 77, 16), True),
                                               (torch.bfloat16, (300, 48, 130, 1024), True),
                                               (torch.float64, (6, 5, 300, 2), True)]:
        hid = torch.randn(n, h, device=DEV).to(dtype)
        w = (torch.randn(v, h, device=DEV) / h**0.5).to(dtype)
        b = torch.randn(v, device=DEV).to(dtype) if with_bias else None
        lab = torch.randint(0, v, (n,), device=DEV)
        lab[[0, 3]] = -100
        g = torch.randn(n, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

        def fn(hid, w, b, backend):
            return lk.linear_token_logprobs(hid, w, lab, bias=b, backend=backend, chunk_size=chunk)

        (o,), grads = _grads(fn, [hid, w, b], "cuda", [g])
        up = [t.double() if t is not None else None for t in (hid, w, b)]
        (r,), rgrads = _grads(fn, up, "reference", [g])
        tag = f"{dtype} n{n} h{h} v{v} chunk{chunk}{' bias' if with_bias else ''}"
        _check(f"linear_token_logprobs fwd {tag}", o, r, 1e-4, 1e-3)
        for name, a, c in zip(("hidden", "weight", "bias"), grads, rgrads):
            if c is not None:
                _check(f"linear_token_logprobs bwd d{name} {tag}", a, c, 5e-2, 5e-2)
        lse = OPS.linear_token_logprobs_fwd(hid, w, b, lab, -100, chunk)[1]
        for need in [(True, False, False), (False, True, False), (True, False, bool(with_bias))]:
            OPS.linear_token_logprobs_bwd(g, hid, w, b, lab, lse, -100, chunk, *need)
        torch.cuda.synchronize()
        print(f"ok  linear_token_logprobs bwd need-flag subsets {tag}")

    # ----------------------------------------------------------------------- gumbel_softmax_codes
    for dtype, (bsz, k, d), hard in [(torch.float32, (37, 33, 300), False), (torch.bfloat16, (5, 12, 24), True),
                                     (torch.float64, (3, 1024, 8), False), (torch.float16, (9, 100, 3), True)]:
        lg, cb = (torch.randn(bsz, k, device=DEV) * 2).to(dtype), torch.randn(k, d, device=DEV).to(dtype)
        gw, gz = torch.randn(bsz, k, device=DEV), torch.randn(bsz, d, device=DEV)

        def fn(lg, cb, backend):
            return lk.gumbel_softmax_codes(lg, cb, tau=0.7, hard=hard, seed=2**33 + 5, offset=2**32 - 9,
                                           backend=backend)

        outs, grads = _grads(fn, [lg, cb], "cuda", [gw, gz])
        routs, rgrads = _grads(fn, [lg, cb], "reference", [gw, gz])
        tag = f"{dtype} {bsz}x{k}x{d}{' hard' if hard else ''}"
        for name, a, c in zip(("weights", "z", "dlogits", "dcodebook"), outs + grads, routs + rgrads):
            _check(f"gumbel_softmax_codes {name} {tag}", a, c, 2e-2, 1e-4)

    # ---------------------------------------------------------------------------- preference_loss
    for loss_type, bsz, k, kw in [("dpo", 6, 5, 0.05), ("ipo", 1000, 32, 0.1), ("simpo", 70, 1024, 0.05),
                                  ("dpo", 65536, 0, 0.0)]:
        pc, pr, rc, rr = (torch.randn(bsz, device=DEV) * 5 - 20 for _ in range(4))
        cl, rl = torch.randint(1, 30, (bsz,), device=DEV), torch.randint(1, 30, (bsz,), device=DEV).float()
        prior = torch.randn(bsz, k, device=DEV) if k else None
        post = torch.randn(bsz, k, device=DEV).bfloat16() if k else None
        refs = (rc, rr) if loss_type != "simpo" else (None, None)

        def fn(pc, pr, rc, rr, prior, post, backend):
            return tuple(lk.preference_loss(pc, pr, rc, rr, chosen_lengths=cl, rejected_lengths=rl,
                                            prior_logits=prior, posterior_logits=post, loss_type=loss_type,
                                            beta=0.1 if loss_type != "simpo" else 2.0,
                                            gamma=0.5 if loss_type == "simpo" else 0.0,
                                            label_smoothing=0.1 if loss_type != "ipo" else 0.0, kl_weight=kw,
                                            backend=backend))

        cot = [torch.randn((), device=DEV), *(torch.randn(bsz, device=DEV) for _ in range(4))]
        inputs = [pc, pr, *refs, prior, post]
        outs, grads = _grads(fn, inputs, "cuda", cot)
        routs, rgrads = _grads(fn, inputs, "reference", cot)
        tag = f"{loss_type} B={bsz} K={k}"
        for i, (a, c) in enumerate(zip(outs + grads, routs + rgrads)):
            if c is not None:
                _check(f"preference_loss {'out' if i < 5 else 'grad'}[{i if i < 5 else i - 5}] {tag}", a, c,
                       1e-2, 1e-4)
    torch.cuda.synchronize()
    print("smoke: all CUDA ops ran forward and backward and agree with the reference backend")


# ------------------------------------------------------------------------------------------ timing
def _time(fn, reps, warmup):
    """Median milliseconds of fn() and its peak extra memory (MiB)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def bench(n, h, v, k, reps, warmup, json_path):
    torch.manual_seed(0)
    dt = torch.bfloat16
    rows = []

    def add(op, phase, ours, eager, eager_name="eager"):
        rows.append(dict(op=op, phase=phase, cuda_ms=ours[0], cuda_peak_mib=ours[1], baseline=eager_name,
                         baseline_ms=eager[0] if eager else None, baseline_peak_mib=eager[1] if eager else None))
        e = f"{eager[0]:9.3f} {eager[1]:10.0f}  {eager[0] / ours[0]:6.2f}x" if eager else " " * 29
        print(f"{op:24s} {phase:9s} {ours[0]:9.3f} {ours[1]:10.0f} {e}  {eager_name}", flush=True)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; N={n} H={h} V={v} K={k} bf16; "
          f"median of {reps} (warmup {warmup})")
    print(f"{'op':24s} {'phase':9s} {'cuda ms':>9s} {'peak MiB':>10s} {'base ms':>9s} {'peak MiB':>10s}  "
          f"{'speedup':>7s}  baseline")

    # token_logprobs ---------------------------------------------------------------------------
    labels = torch.randint(0, v, (n,), device=DEV)
    logits = torch.randn(n, v, device=DEV, dtype=dt)
    g = torch.randn(n, device=DEV)

    def eager_tok(x):
        return torch.log_softmax(x.float(), -1).gather(-1, labels[:, None]).squeeze(-1)

    add("token_logprobs", "fwd", _time(lambda: OPS.token_logprobs_fwd(logits, labels, -100), reps, warmup),
        _time(lambda: eager_tok(logits), reps, warmup))
    lse = OPS.token_logprobs_fwd(logits, labels, -100)[1]
    add("token_logprobs", "bwd", _time(lambda: OPS.token_logprobs_bwd(g, logits, labels, lse, -100), reps, warmup),
        None)
    scratch = logits.clone()
    add("token_logprobs", "bwd_", _time(lambda: OPS.token_logprobs_bwd_(g, scratch, labels, lse, -100), reps,
                                        warmup), None, "(in place)")
    del scratch
    leaf = logits.detach().requires_grad_(True)

    def ours_tok_fb():
        leaf.grad = None
        lk.token_logprobs(leaf, labels, backend="cuda").backward(g)

    def eager_tok_fb():
        leaf.grad = None
        eager_tok(leaf).backward(g)

    add("token_logprobs", "fwd+bwd", _time(ours_tok_fb, reps, warmup), _time(eager_tok_fb, reps, warmup))
    del leaf, logits, lse
    _free()

    # linear_token_logprobs --------------------------------------------------------------------
    hidden = torch.randn(n, h, device=DEV, dtype=dt)
    weight = (torch.randn(v, h, device=DEV) / h**0.5).to(dt)

    def eager_lin(hd, wt):
        return torch.log_softmax((hd @ wt.T).float(), -1).gather(-1, labels[:, None]).squeeze(-1)

    add("linear_token_logprobs", "fwd", _time(lambda: OPS.linear_token_logprobs_fwd(hidden, weight, None, labels,
                                                                                    -100, 1024), reps, warmup),
        _time(lambda: eager_lin(hidden, weight), reps, warmup))
    hl, wl = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)

    def ours_lin_fb():
        hl.grad = wl.grad = None
        lk.linear_token_logprobs(hl, wl, labels, backend="cuda").backward(g)

    def eager_lin_fb():
        hl.grad = wl.grad = None
        eager_lin(hl, wl).backward(g)

    add("linear_token_logprobs", "fwd+bwd", _time(ours_lin_fb, reps, warmup), _time(eager_lin_fb, reps, warmup))
    del hl, wl, hidden, weight
    _free()

    # gumbel_softmax_codes -----------------------------------------------------------------------
    glog = torch.randn(n, k, device=DEV)
    book = torch.randn(k, h, device=DEV, dtype=dt)
    gw, gz = torch.randn(n, k, device=DEV), torch.randn(n, h, device=DEV, dtype=dt)
    for phase in ("fwd", "fwd+bwd"):
        def run(backend, phase=phase):
            a = glog.detach().requires_grad_(phase != "fwd")
            e = book.detach().requires_grad_(phase != "fwd")
            w, z = lk.gumbel_softmax_codes(a, e, tau=1.0, seed=1, offset=0, backend=backend)
            if phase != "fwd":
                torch.autograd.backward([w, z], [gw, gz])

        def run_rng(phase=phase):
            a = glog.detach().requires_grad_(phase != "fwd")
            e = book.detach().requires_grad_(phase != "fwd")
            w = F.gumbel_softmax(a, tau=1.0)
            z = w.to(dt) @ e
            if phase != "fwd":
                torch.autograd.backward([w, z], [gw, gz])

        ours = _time(lambda: run("cuda"), reps, warmup)
        add("gumbel_softmax_codes", phase, ours, _time(lambda: run("reference"), reps, warmup), "reference")
        add("gumbel_softmax_codes", phase, ours, _time(run_rng, reps, warmup), "eager-rng")
    del glog, book, gw, gz
    _free()

    # preference_loss ----------------------------------------------------------------------------
    pc, pr, rc, rr = (torch.randn(n, device=DEV) * 5 - 20 for _ in range(4))
    prior, post = torch.randn(n, k, device=DEV), torch.randn(n, k, device=DEV)
    cots = [torch.randn((), device=DEV), *(torch.randn(n, device=DEV) for _ in range(4))]
    for phase in ("fwd", "fwd+bwd"):
        def run_pref(backend, phase=phase):
            ts = [t.detach().requires_grad_(phase != "fwd") for t in (pc, pr, rc, rr, prior, post)]
            out = lk.preference_loss(*ts[:4], prior_logits=ts[4], posterior_logits=ts[5], kl_weight=0.05,
                                     backend=backend)
            if phase != "fwd":
                torch.autograd.backward(list(out), cots)

        add("preference_loss", phase, _time(lambda: run_pref("cuda"), reps, warmup),
            _time(lambda: run_pref("reference"), reps, warmup), "reference")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, n=n, h=h, v=v, k=k,
                           reps=reps, rows=rows), f, indent=1)
        print(f"wrote {json_path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", action="store_true", help="time each CUDA op against eager PyTorch")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--h", type=int, default=4096)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--k", type=int, default=32, help="codes (gumbel_softmax_codes, preference_loss KL)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_smoke: no CUDA GPU visible")
    reason = unavailable_reason("cuda", DEV)
    if reason is not None:
        sys.exit(f"cuda_smoke: the cuda backend is unavailable: {reason}")
    if args.bench:
        bench(args.n, args.h, args.v, args.k, args.reps, args.warmup, args.json)
    else:
        smoke()


if __name__ == "__main__":
    main()
