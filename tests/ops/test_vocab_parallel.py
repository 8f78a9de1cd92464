"""``lk.vocab_parallel_linear_token_logprobs`` on 2 CPU processes (gloo) against the single-process op.

Every multi-process case runs in ONE spawned 2-rank job (process start-up and imports dominate the cost):
each rank builds the same full problem from a seeded generator, keeps its vocab shard, and compares
log-probs and gradients with (a) the single-process ``lk.linear_token_logprobs`` on the full weight and
(b) the float64 formula of tests/helpers/formulas.py with float64 autograd (independent of the code under test).
Each rank writes the outcome of every case to a JSON file as it goes; the module fixture starts the job
(FileStore rendezvous in a tmp dir: no ports), bounds it with a timeout and kills it if it hangs, and
one pytest test per case reads the verdicts. The rank-failure test runs a real job in a subprocess.
Argument checks that need no other rank run in this process, with no process group.
"""

import math
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import lpc_kernels as lk
from lpc_kernels.backends import unavailable_reason
from tests.helpers import REPO
from tests.helpers.formulas import f_linear_token_logprobs
from tests.helpers.spawned_jobs import check_verdict, run_cases, run_job

WORLD = 2
JOB_TIMEOUT_S = 240  # whole spawned job, start-up included (a hang fails the tests, it never blocks CI)
GLOO_TIMEOUT_S = 30  # a desynchronised collective inside the job errors instead of waiting forever

# name: backend, dtype, leading shape, H, V, shards [(vocab_start, V_local) for rank 0, rank 1], bias,
# ignore_index, logits scale, tolerance. Shards are uneven (V odd) and in either rank order.
CASES = {
    "reference_fp64_bias_uneven": dict(backend="reference", dtype=torch.float64, lead=(3, 4), H=8, V=11,
                                       shards=[(0, 5), (5, 6)], bias=True, ignore_index=-100, scale=1.0, tol=1e-10),
    # rank 0 holds the top of the vocab; ignore_index 3 is also a vocab id (global 9 is local 3 on rank 0)
    "reference_fp64_reversed_ranks_ignore_is_a_vocab_id": dict(
        backend="reference", dtype=torch.float64, lead=(10,), H=8, V=11, shards=[(6, 5), (0, 6)], bias=False,
        ignore_index=3, scale=1.0, tol=1e-10),
    # logits of magnitude ~1e4: the reduction must stay finite and exact
    "reference_fp64_large_logits": dict(backend="reference", dtype=torch.float64, lead=(8,), H=8, V=9,
                                        shards=[(0, 4), (4, 5)], bias=True, ignore_index=-100, scale=3e3, tol=1e-10),
    "cpu_fp32_bias_uneven": dict(backend="cpu", dtype=torch.float32, lead=(2, 5), H=16, V=37,
                                 shards=[(0, 20), (20, 17)], bias=True, ignore_index=-100, scale=1.0, tol=1e-5),
    "cpu_fp32_one_row_shard": dict(backend="cpu", dtype=torch.float32, lead=(6,), H=4, V=5,
                                   shards=[(0, 4), (4, 1)], bias=False, ignore_index=-100, scale=1.0, tol=1e-5),
    "triton_fp32_bias_uneven": dict(backend="triton", dtype=torch.float32, lead=(6,), H=16, V=13,
                                    shards=[(0, 7), (7, 6)], bias=True, ignore_index=-100, scale=1.0, tol=1e-5),
}
OTHER_CASES = ["all_rows_ignored", "no_reduce_hidden_grad", "weight_grad_only", "bf16_cpu_within_dtype_error",
               "world_checks_raise_on_every_rank"]


# ----------------------------------------------------------------------------------- in-child helpers
def _close(what, ours, ref, tol):
    """``|ours - ref| <= tol * (1 + |ref|)`` elementwise, with a message naming the quantity."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = ((ours - ref).abs() / (1 + ref.abs())).max().item()
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.0e}"


def _problem(cfg, seed=0):
    """The full problem, identical on every rank (seeded generator), in float64 before rounding."""
    gen = torch.Generator().manual_seed(seed)
    lead, h, v = cfg["lead"], cfg["H"], cfg["V"]
    hidden = torch.randn(*lead, h, generator=gen, dtype=torch.float64) * cfg["scale"]
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / math.sqrt(h)
    bias = torch.randn(v, generator=gen, dtype=torch.float64) if cfg["bias"] else None
    labels = torch.randint(0, v, lead, generator=gen)
    flat = labels.view(-1)
    # shard boundaries: the last id of one shard and the first of the next, plus both vocab ends
    edges = sorted({s for s, _ in cfg["shards"]} | {s + n - 1 for s, n in cfg["shards"]} | {0, v - 1})
    for i, e in enumerate(edges[: flat.numel() - 2]):
        flat[i] = e
    flat[-1] = cfg["ignore_index"]
    flat[-2 if flat.numel() > 3 else -1] = cfg["ignore_index"]
    grad = torch.randn(lead, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, labels, grad


def _leaf(t, dtype):
    return None if t is None else t.to(dtype).detach().clone().requires_grad_(True)


def _compare_case(cfg, rank):
    dt, backend = cfg["dtype"], cfg["backend"]
    dev = torch.device(cfg.get("device", "cpu"))
    hidden, weight, bias, labels, grad = (t.to(dev) if t is not None else None for t in _problem(cfg))
    start, size = cfg["shards"][rank]
    ii = cfg["ignore_index"]
    # single process, full weight
    h1, w1, b1 = _leaf(hidden, dt), _leaf(weight, dt), _leaf(bias, dt)
    out1 = lk.linear_token_logprobs(h1, w1, labels, bias=b1, ignore_index=ii, backend=backend)
    (out1 * grad.to(out1.dtype)).sum().backward()
    # float64 truth on the dtype-rounded inputs, independent of lpc_kernels
    h64, w64, b64 = (_leaf(t.to(dt), torch.float64) if t is not None else None for t in (hidden, weight, bias))
    truth = f_linear_token_logprobs(h64, w64, labels, b64, ii)
    (truth * grad).sum().backward()
    # vocab-parallel, this rank's shard
    hp, wp = _leaf(hidden, dt), _leaf(weight[start:start + size], dt)
    bp = _leaf(bias[start:start + size], dt) if bias is not None else None
    outp = lk.vocab_parallel_linear_token_logprobs(hp, wp, labels, vocab_start=start, bias_shard=bp,
                                                   ignore_index=ii, backend=backend)
    assert outp.dtype == out1.dtype and outp.shape == labels.shape
    (outp * grad.to(outp.dtype)).sum().backward()
    tol = cfg["tol"]
    ignored = labels == ii
    assert (outp[ignored] == 0).all(), "ignored rows must have log-prob 0"
    assert (hp.grad[ignored] == 0).all(), "ignored rows must have zero hidden gradient"
    for what, ours, single, exact in (("logp", outp, out1, truth), ("d hidden", hp.grad, h1.grad, h64.grad),
                                      ("d weight_shard", wp.grad, w1.grad[start:start + size],
                                       w64.grad[start:start + size])):
        _close(f"{what} vs single-process op", ours, single, tol)
        _close(f"{what} vs float64 formula", ours, exact, tol)
    if bias is not None:
        _close("d bias_shard vs single-process op", bp.grad, b1.grad[start:start + size], tol)
        _close("d bias_shard vs float64 formula", bp.grad, b64.grad[start:start + size], tol)


def _backend_skip_reason(backend, device="cpu"):
    return unavailable_reason(backend, torch.device(device))


def _all_rows_ignored(rank):
    cfg = dict(CASES["reference_fp64_bias_uneven"])
    hidden, weight, bias, labels, grad = _problem(cfg)
    labels = torch.full_like(labels, -100)
    start, size = cfg["shards"][rank]
    hp, wp, bp = _leaf(hidden, torch.float64), _leaf(weight[start:start + size], torch.float64), \
        _leaf(bias[start:start + size], torch.float64)
    out = lk.vocab_parallel_linear_token_logprobs(hp, wp, labels, vocab_start=start, bias_shard=bp,
                                                  backend="reference")
    (out * grad).sum().backward()
    for what, t in (("logp", out), ("d hidden", hp.grad), ("d weight_shard", wp.grad), ("d bias_shard", bp.grad)):
        assert torch.equal(t, torch.zeros_like(t)), f"{what} must be all zeros when every row is ignored"


def _no_reduce_hidden_grad(rank):
    cfg = CASES["reference_fp64_bias_uneven"]
    hidden, weight, bias, labels, grad = _problem(cfg)
    start, size = cfg["shards"][rank]
    hp, wp = _leaf(hidden, torch.float64), _leaf(weight[start:start + size], torch.float64)
    out = lk.vocab_parallel_linear_token_logprobs(hp, wp, labels, vocab_start=start, backend="reference",
                                                  reduce_hidden_grad=False)
    (out * grad).sum().backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    (f_linear_token_logprobs(h64, w64, labels) * grad).sum().backward()
    share = hp.grad.clone()
    assert (share - h64.grad).abs().max() > 1e-3, "without the reduction d hidden must be this shard's share only"
    dist.all_reduce(share)  # what the caller's own tensor-parallel layer would do
    _close("sum over ranks of the d hidden shares vs float64 formula", share, h64.grad, 1e-10)
    _close("d weight_shard vs float64 formula", wp.grad, w64.grad[start:start + size], 1e-10)


def _weight_grad_only(rank):
    cfg = CASES["cpu_fp32_bias_uneven"] if _backend_skip_reason("cpu") is None else CASES["reference_fp64_bias_uneven"]
    hidden, weight, bias, labels, grad = _problem(cfg)
    start, size = cfg["shards"][rank]
    dt = cfg["dtype"]
    hp = hidden.to(dt)  # frozen features: no hidden gradient, so no backward all-reduce either
    wp, bp = _leaf(weight[start:start + size], dt), _leaf(bias[start:start + size], dt)
    out = lk.vocab_parallel_linear_token_logprobs(hp, wp, labels, vocab_start=start, bias_shard=bp,
                                                  backend=cfg["backend"])
    (out * grad.to(out.dtype)).sum().backward()
    w64, b64 = _leaf(weight.to(dt), torch.float64), _leaf(bias.to(dt), torch.float64)
    (f_linear_token_logprobs(hp.double(), w64, labels, b64) * grad).sum().backward()
    _close("d weight_shard vs float64 formula", wp.grad, w64.grad[start:start + size], cfg["tol"])
    _close("d bias_shard vs float64 formula", bp.grad, b64.grad[start:start + size], cfg["tol"])


def _bf16_cpu(rank):
    """bf16 inputs: our error against float64 truth stays within a few times the single-process op's own."""
    if _backend_skip_reason("cpu") is not None:
        return f"skipped: {_backend_skip_reason('cpu')}"
    cfg = dict(CASES["cpu_fp32_bias_uneven"], dtype=torch.bfloat16)
    hidden, weight, bias, labels, grad = _problem(cfg, seed=1)
    start, size = cfg["shards"][rank]
    dt = torch.bfloat16
    h1, w1, b1 = _leaf(hidden, dt), _leaf(weight, dt), _leaf(bias, dt)
    out1 = lk.linear_token_logprobs(h1, w1, labels, bias=b1, backend="cpu")
    (out1 * grad.float()).sum().backward()
    h64, w64, b64 = (_leaf(t.to(dt), torch.float64) for t in (hidden, weight, bias))
    truth = f_linear_token_logprobs(h64, w64, labels, b64)
    (truth * grad).sum().backward()
    hp, wp, bp = _leaf(hidden, dt), _leaf(weight[start:start + size], dt), _leaf(bias[start:start + size], dt)
    outp = lk.vocab_parallel_linear_token_logprobs(hp, wp, labels, vocab_start=start, bias_shard=bp, backend="cpu")
    (outp * grad.float()).sum().backward()
    sl = slice(start, start + size)
    for what, ours, single, exact in (("logp", outp, out1, truth), ("d hidden", hp.grad, h1.grad, h64.grad),
                                      ("d weight_shard", wp.grad, w1.grad[sl], w64.grad[sl]),
                                      ("d bias_shard", bp.grad, b1.grad[sl], b64.grad[sl])):
        ours, single, exact = ours.double(), single.double(), exact.double()
        scale = exact.abs().max().item()
        # bf16 gradients carry 2**-8 relative rounding; the stand-in correction adds at most one more
        # rounding of the same size per rank (see docs/design.md, "Vocab-parallel LM head")
        bound = 2 * (single - exact).abs().max().item() + 2 * WORLD * 2.0 ** -8 * scale + 1e-6
        err = (ours - exact).abs().max().item()
        assert err <= bound, f"{what}: error {err:.3e} vs float64 truth exceeds {bound:.3e}"


def _expect_raise(call, exc, *needles):
    try:
        call()
    except exc as e:
        for n in needles:
            assert n in str(e), f"error {str(e)!r} does not mention {n!r}"
        return
    raise AssertionError(f"expected {exc.__name__} mentioning {needles}, nothing raised")


def _world_checks(rank):
    """Mismatches across ranks: every rank raises the same clear error after the one all_gather."""
    cfg = CASES["reference_fp64_bias_uneven"]
    hidden, weight, bias, labels, _ = _problem(cfg)
    start, size = cfg["shards"][rank]
    f = lk.vocab_parallel_linear_token_logprobs
    w = weight[start:start + size]

    def valid_call():  # the group must still be usable after each error: no rank left in a collective
        out = f(hidden, w, labels, vocab_start=start, backend="reference")
        _close("logp after an error", out, f_linear_token_logprobs(hidden, weight, labels), 1e-10)

    # overlapping shards: both ranks start at 0
    _expect_raise(lambda: f(hidden, weight[:size], labels, vocab_start=0, backend="reference"), ValueError,
                  "tile the vocabulary", "rank 0: vocab_start=0", "rank 1: vocab_start=0")
    valid_call()
    # a gap: rank 1's shard starts one id late
    _expect_raise(lambda: f(hidden, w, labels, vocab_start=start + rank, backend="reference"), ValueError,
                  "tile the vocabulary", "expected a shard starting at 5")
    valid_call()
    # labels inside rank 0's local range but beyond the global vocab
    bad = labels.clone()
    bad.view(-1)[0] = cfg["V"]
    _expect_raise(lambda: f(hidden, w, bad, vocab_start=start, backend="reference"), ValueError,
                  "labels must be in [0, 11)", f"got {cfg['V']}")
    neg = labels.clone()
    neg.view(-1)[0] = -5
    _expect_raise(lambda: f(hidden, w, neg, vocab_start=start, backend="reference"), ValueError,
                  "labels must be in [0, 11)", "got -5")
    valid_call()
    # labels that differ between ranks
    other = labels.clone()
    other.view(-1)[0] = (other.view(-1)[0] + rank) % cfg["V"]
    _expect_raise(lambda: f(hidden, w, other, vocab_start=start, backend="reference"), ValueError,
                  "labels must be identical on every rank")
    # hidden size that differs between ranks (each rank consistent by itself)
    h_r = cfg["H"] + rank
    _expect_raise(lambda: f(torch.randn(*cfg["lead"], h_r, dtype=torch.float64),
                            torch.randn(size, h_r, dtype=torch.float64), labels, vocab_start=start,
                            backend="reference"), ValueError, "same hidden size H", "rank 1: H=9")
    # bias on one rank only
    b = bias[start:start + size] if rank == 0 else None
    _expect_raise(lambda: f(hidden, w, labels, vocab_start=start, bias_shard=b, backend="reference"), ValueError,
                  "bias_shard must be given on every rank or on none")
    # hidden requires grad on one rank only: the backward all-reduce would hang
    hr = hidden.clone().requires_grad_(rank == 0)
    _expect_raise(lambda: f(hr, w, labels, vocab_start=start, backend="reference"), ValueError,
                  "hidden must require grad on every rank or on none")
    # a non-member rank (group of rank 0 only: new_group is collective, every rank calls it)
    solo = dist.new_group([0])
    if rank == 1:
        _expect_raise(lambda: f(hidden, w, labels, vocab_start=start, process_group=solo, backend="reference"),
                      ValueError, "process_group does not contain this rank")
    else:  # a one-rank group whose shard is the whole vocabulary reduces to the single-process op
        out = f(hidden, weight, labels, vocab_start=0, process_group=solo, backend="reference")
        _close("logp on a one-rank group", out, f_linear_token_logprobs(hidden, weight, labels), 1e-10)
    valid_call()


def _cpu_runs(rank):
    runs = [(name, (lambda cfg=cfg: _compare_case(cfg, rank)), _backend_skip_reason(cfg["backend"]))
            for name, cfg in CASES.items()]
    return runs + [("all_rows_ignored", lambda: _all_rows_ignored(rank), None),
                   ("no_reduce_hidden_grad", lambda: _no_reduce_hidden_grad(rank), None),
                   ("weight_grad_only", lambda: _weight_grad_only(rank), None),
                   ("bf16_cpu_within_dtype_error", lambda: _bf16_cpu(rank), None),
                   ("world_checks_raise_on_every_rank", lambda: _world_checks(rank), None)]


# GPU: CUDA tensors. Two ranks share the one GPU through gloo (NCCL refuses two ranks on one device);
# one rank alone checks the NCCL path. Shapes larger than on CPU: the kernels tile over V and H.
GPU_CASES = {
    f"{backend}_{name}": dict(backend=backend, dtype=dtype, device="cuda", lead=(4, 33), H=128, V=1001,
                              shards=[(0, 517), (517, 484)], bias=True, ignore_index=-100, scale=1.0, tol=tol)
    for backend in ("cuda", "triton") for name, dtype, tol in (("fp32", torch.float32, 1e-5),
                                                                ("fp64", torch.float64, 1e-10))
}


def _gpu_runs(rank, world):
    runs = []
    for name, cfg in GPU_CASES.items():
        if world == 1:  # the whole vocabulary on the one rank
            cfg = dict(cfg, shards=[(0, cfg["V"])])
        runs.append((name, (lambda cfg=cfg: _compare_case(cfg, rank)), _backend_skip_reason(cfg["backend"], "cuda")))
    return runs


def _job(rank, store_file, out_dir, world=WORLD, pg_backend="gloo", which="cpu"):
    """One rank of a spawned job: runs every case, recording 'ok', 'skipped: ...' or the traceback."""
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    if which == "gpu":
        torch.cuda.set_device(0)
    dist.init_process_group(pg_backend, init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    run_cases(rank, out_dir, _cpu_runs(rank) if which == "cpu" else _gpu_runs(rank, world))
    dist.destroy_process_group()


def _run_job(tmp, world, pg_backend, which):
    """Run the spawned job; return ({rank: {case: verdict}}, job error or None)."""
    return run_job(_job, (str(tmp / "store"), str(tmp), world, pg_backend, which), world, JOB_TIMEOUT_S, str(tmp))


@pytest.fixture(scope="module")
def job_results(tmp_path_factory):
    return _run_job(tmp_path_factory.mktemp("vocab_parallel"), WORLD, "gloo", "cpu")


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_gloo_results(tmp_path_factory):
    return _run_job(tmp_path_factory.mktemp("vocab_parallel_gpu_gloo"), WORLD, "gloo", "gpu")


@pytest.fixture(scope="module")
def gpu_nccl_results(tmp_path_factory):
    return _run_job(tmp_path_factory.mktemp("vocab_parallel_gpu_nccl"), 1, "nccl", "gpu")


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES) + OTHER_CASES)
def test_two_ranks_match_single_process(job_results, case):
    check_verdict(job_results, case)


@pytest.mark.distributed
@pytest.mark.cuda
@NO_GPU
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_two_ranks_gloo_match_single_process(gpu_gloo_results, case):
    check_verdict(gpu_gloo_results, case)


@pytest.mark.distributed
@pytest.mark.cuda
@NO_GPU
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_one_rank_nccl_matches_single_process(gpu_nccl_results, case):
    check_verdict(gpu_nccl_results, case)


@pytest.mark.distributed
def test_rank_error_fails_the_job_without_hang(tmp_path):
    """Rank 1 raises (bad dtype, before any collective) while rank 0 waits in the all_gather: the spawned
    job must exit non-zero with rank 1's error in its output, long before the gloo timeout (600 s): the
    launcher tears rank 0 down, or gloo sees rank 1's connection close."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        import traceback
        from datetime import timedelta
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        import lpc_kernels as lk

        def worker(rank, store):
            try:
                run(rank, store)
            except BaseException:
                # each rank prints its own error, as under torchrun: mp.spawn reports only the first rank
                # it sees fail, which may be rank 0's "Connection closed by peer" when rank 1 is the cause
                traceback.print_exc()
                raise

        def run(rank, store):
            torch.set_num_threads(1)
            # a gloo timeout far beyond the test's: only the launcher's teardown can end rank 0's wait
            dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                                    timeout=timedelta(seconds=600))
            hidden = torch.randn(4, 8, dtype=torch.float64 if rank == 1 else torch.float32)
            lk.vocab_parallel_linear_token_logprobs(hidden, torch.randn(3, 8), torch.tensor([0, 1, 2, 5]),
                                                    vocab_start=3 * rank, backend="reference")

        if __name__ == "__main__":
            mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True,
                              text=True, timeout=120, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired as exc:  # run() has killed the launcher; its children follow it
        pytest.fail(f"the job hung: no exit within 120 s\n{exc.stderr}")
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, "a rank raised but the job exited 0"
    assert "hidden (torch.float64) and weight_shard (torch.float32) must have the same dtype" in proc.stderr, \
        proc.stderr[-3000:]
    assert elapsed < 120


# --------------------------------------------------------------- checks that need no other rank
def _args():
    return dict(hidden=torch.randn(2, 3, 8), weight_shard=torch.randn(5, 8), labels=torch.randint(0, 5, (2, 3)),
                vocab_start=0)


@pytest.mark.parametrize("change, exc, needle", [
    (dict(weight_shard=torch.randn(40)), ValueError, "weight_shard must be 2-D"),
    (dict(weight_shard=torch.randn(0, 8)), ValueError, "weight_shard must have shape [V_local, H]"),
    (dict(hidden=torch.randn(2, 3, 7)), ValueError, "hidden must have shape [..., H] with H = weight_shard.shape[1]"),
    (dict(hidden=torch.randn(2, 3, 8, dtype=torch.float64)), TypeError, "weight_shard (torch.float32)"),
    (dict(hidden=torch.randn(2, 3, 8).int()), TypeError, "hidden must have dtype"),
    (dict(labels=torch.zeros(3, 2, dtype=torch.long)), ValueError, "labels must have shape (2, 3)"),
    (dict(labels=torch.zeros(2, 3)), TypeError, "labels must have dtype"),
    (dict(bias_shard=torch.randn(4)), ValueError, "bias_shard must have shape [V_local] = [5]"),
    (dict(bias_shard=torch.randn(5, dtype=torch.float64)), TypeError, "bias_shard must have dtype"),
    (dict(vocab_start=-1), ValueError, "vocab_start must be >= 0"),
    (dict(vocab_start=2.0), TypeError, "vocab_start must be an int"),
    (dict(vocab_start=True), TypeError, "vocab_start must be an int"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(reduce_hidden_grad=1), TypeError, "reduce_hidden_grad must be a bool"),
    (dict(hidden=torch.randn(0, 8), labels=torch.zeros(0, dtype=torch.long)), ValueError, "hidden is empty"),
    (dict(process_group="tp"), TypeError, "process_group must be a torch.distributed.ProcessGroup"),
    (dict(backend="tpu"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_arguments_name_the_argument(change, exc, needle):
    args = _args()
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight_shard"), args.pop("labels")
    with pytest.raises(exc) as info:
        lk.vocab_parallel_linear_token_logprobs(hidden, weight, labels, **args)
    assert needle in str(info.value)


def test_needs_an_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this pytest process")
    args = _args()
    with pytest.raises(RuntimeError, match="init_process_group"):
        lk.vocab_parallel_linear_token_logprobs(args["hidden"], args["weight_shard"], args["labels"], vocab_start=0)
