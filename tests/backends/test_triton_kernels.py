"""The triton backend's kernels against the float64 reference.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it before anything imports
Triton); with ``TRITON_INTERPRET=0`` and a GPU the same tests run on CUDA (``LPC_TRITON_AUTOTUNE=0`` skips
the tuning sweeps there). The interpreter pays milliseconds per program instance and loop step (each
call of a ``@triton.jit`` helper re-patches builtins), so shapes are small and blocks wide; its configs live
in module-level dicts of each kernel file, and a few tests shrink them (monkeypatch) to force several
blocks, V splits or the streamed-K path (the fused LM head's live in linear_token_logprobs_configs.py).

Tolerance (Cut Cross-Entropy style): ``truth`` is the reference backend on float64 copies of the
(dtype-rounded) inputs, ``same`` is the reference backend on the inputs themselves (fp32 math, outputs
rounded to the input dtype), and ``|ours - truth| <= 2 |same - truth| + atol + rtol |truth|``. So a
16-bit gradient may be off by what rounding to 16 bits costs PyTorch plus a little (``atol`` one 16-bit
ulp at the largest magnitude: the GPU path rounds the logits gradient tile to bf16/fp16 before the
tensor-core matmuls, as CCE and Liger do).
"""

import math

import pytest
import torch
from torch.library import opcheck

import lpc_kernels as lk
from lpc_kernels import reference as R
from lpc_kernels.backends import triton_interpreted, unavailable_reason
from lpc_kernels.numerics import compute_dtype
from lpc_kernels.preference import PreferenceLossInputs, PreferenceLossOptions, PreferenceLossOutput
from tests.helpers import REPO
from tests.helpers.backend_checks import truth_close
from tests.helpers.raw_op_cases import public_op_cases

pytestmark = pytest.mark.triton

INTERPRETED = triton_interpreted()
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")
if unavailable_reason("triton", DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton', DEVICE)}", allow_module_level=True)

from lpc_kernels import triton as T  # noqa: E402  (after the availability check: imports triton)
from lpc_kernels.triton import gumbel_softmax as T_gumbel  # noqa: E402
from lpc_kernels.triton import linear_token_logprobs as T_linear  # noqa: E402
from lpc_kernels.triton import linear_token_logprobs_configs as T_linear_cfg  # noqa: E402
from lpc_kernels.triton import linear_token_logprobs_split_bwd as T_linear_split  # noqa: E402
from lpc_kernels.triton import preference_loss as T_pref  # noqa: E402
from lpc_kernels.triton import token_logprobs as T_token  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def d64(t):
    return t.double() if t is not None and t.is_floating_point() else t


def check(ours, truth, same=None, rtol=1e-5, atol=1e-6, what=""):
    """``|ours - truth| <= 2 |same - truth| + atol + rtol |truth|`` elementwise; no NaN/inf in ``ours``."""
    same_err = None if same is None else (same.detach().double().cpu() - truth.detach().double().cpu()).abs()
    truth_close(ours, truth, same_err, rtol=rtol, atol=atol, what=what)


def grad_atol(dtype, truth):
    """One ulp of ``dtype`` at the largest gradient magnitude (16-bit); tiny for fp32/fp64."""
    scale = truth.abs().max().item() if truth.numel() else 0.0
    if dtype in HALF:
        return ULP[dtype] * scale
    return 1e-6 * scale if dtype == torch.float32 else 1e-12 * scale


# ------------------------------------------------------------------------------------- token_logprobs
def _token_case(logits, labels, g):
    ours = T.token_logprobs_fwd(logits, labels, -100)
    truth = R.token_logprobs_fwd(logits.double(), labels, -100)
    same = R.token_logprobs_fwd(logits, labels, -100)
    g_ours = T.token_logprobs_bwd(g.to(ours[1].dtype), logits, labels, ours[1], -100, False)
    g_truth = R.token_logprobs_bwd(g.double(), logits.double(), labels, truth[1], -100, False)
    g_same = R.token_logprobs_bwd(g.to(same[1].dtype), logits, labels, same[1], -100, False)
    return ours, truth, same, g_ours, g_truth, g_same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_token_logprobs(dtype):
    n, v = 5, 3000  # V = 2.93 interpreter blocks: a masked tail block
    logits = (torch.randn(n, v, device=DEVICE) * 5).to(dtype)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[1] = -100
    labels[3] = v - 1  # target in the masked tail block
    g = torch.randn(n, device=DEVICE)
    (logp, lse), truth, same, gx, g_truth, g_same = _token_case(logits, labels, g)
    assert logp.dtype == lse.dtype == compute_dtype(logits) and gx.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    check(logp, truth[0], same[0], rtol=tol, atol=tol, what="logp")
    check(lse, truth[1], same[1], rtol=tol, atol=tol, what="lse")
    assert logp[1] == 0 and lse[1] == 0
    check(gx, g_truth, g_same, rtol=tol, atol=grad_atol(dtype, g_truth), what="grad")
    assert torch.equal(gx[1], torch.zeros_like(gx[1]))
    # in place: the same bits, written into the logits buffer
    buf = logits.clone()
    out = T.token_logprobs_bwd(g.to(lse.dtype), buf, labels, lse, -100, True)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, gx)


def test_token_logprobs_single_row_large_magnitude_and_neg_inf():
    logits = torch.randn(3, 777, device=DEVICE) * 1e4
    logits[2, :500] = float("-inf")  # -inf entries (a masked vocabulary) are allowed
    labels = torch.tensor([5, 776, 600], device=DEVICE)
    for rows in (slice(0, 1), slice(0, 3)):  # N = 1, then N = 3
        x, lab = logits[rows].contiguous(), labels[rows].contiguous()
        g = torch.randn(x.shape[0], device=DEVICE)
        (logp, lse), truth, same, gx, g_truth, g_same = _token_case(x, lab, g)
        # fp32 rounding of |x| ~ 1e4 is ~1e-3 absolute: the bound is PyTorch's own fp32 error
        check(logp, truth[0], same[0], what="logp")
        check(lse, truth[1], same[1], what="lse")
        check(gx, g_truth, g_same, what="grad")


def test_token_logprobs_all_ignored():
    logits = torch.randn(4, 100, device=DEVICE) * 1e4
    labels = torch.full((4,), -7, device=DEVICE)
    logp, lse = T.token_logprobs_fwd(logits, labels, -7)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(lse, torch.zeros_like(lse))
    gx = T.token_logprobs_bwd(torch.ones(4, device=DEVICE), logits, labels, lse, -7, False)
    assert torch.equal(gx, torch.zeros_like(gx))  # zeros, no NaN (exp(1e4 - 0) is never formed)


def test_token_logprobs_vocab_128256(monkeypatch):
    monkeypatch.setitem(T_token.INTERPRET_FWD, "BLOCK_V", 8192)
    monkeypatch.setattr(T_token, "INTERPRET_BWD_BLOCK_V", 8192)
    v = 128256
    logits = (torch.randn(2, v, device=DEVICE) * 3).to(torch.bfloat16)
    labels = torch.tensor([0, v - 1], device=DEVICE)
    g = torch.randn(2, device=DEVICE)
    (logp, lse), truth, same, gx, g_truth, g_same = _token_case(logits, labels, g)
    check(logp, truth[0], same[0], what="logp")
    check(gx, g_truth, g_same, atol=grad_atol(torch.bfloat16, g_truth), what="grad")


# ----------------------------------------------------------------------------- linear_token_logprobs
def _linear_inputs(n, h, v, dtype, bias=True, scale=1.0, ignore_every=0):
    hidden = (torch.randn(n, h, device=DEVICE) * scale).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) / math.sqrt(h)).to(dtype)
    b = torch.randn(v, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=DEVICE)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def _linear_check(hidden, weight, bias, labels, need=(True, True, True), rtol=1e-5):
    dtype = hidden.dtype
    logp, lse = T.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, 1024)
    truth = R.linear_token_logprobs_fwd(d64(hidden), d64(weight), d64(bias), labels, -100, 1024)
    same = R.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, 1024)
    tol = 1e-12 if dtype == torch.float64 else rtol
    check(logp, truth[0], same[0], rtol=tol, atol=tol, what="logp")
    check(lse, truth[1], same[1], rtol=tol, atol=tol, what="lse")
    g = torch.randn(labels.shape[0], device=DEVICE)
    need = (need[0], need[1], need[2] and bias is not None)  # as the op passes it
    need_h, need_w, need_b = need
    ours = T.linear_token_logprobs_bwd(g.to(lse.dtype), hidden, weight, bias, labels, lse, -100, 1024, *need)
    g_truth = R.linear_token_logprobs_bwd(g.double(), d64(hidden), d64(weight), d64(bias), labels, truth[1], -100,
                                          1024, *need)
    g_same = R.linear_token_logprobs_bwd(g.to(same[1].dtype), hidden, weight, bias, labels, same[1], -100, 1024,
                                         *need)
    for name, o, t, s, wanted in zip(("hidden", "weight", "bias"), ours, g_truth, g_same,
                                     need):
        if not wanted:
            assert o is None, name
            continue
        assert o.dtype == dtype
        check(o, t, s, rtol=tol, atol=grad_atol(dtype, t), what=f"grad {name}")
    return ours


@pytest.fixture(params=["split", "atomic"])
def bwd_variant(request, monkeypatch):
    """Both backward variants of the fused LM head, chosen the way users do (the environment)."""
    monkeypatch.setenv("LPC_TRITON_LINEAR_BWD", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_token_logprobs(dtype, bias, bwd_variant):
    # 40 rows = 3 row blocks of 16 (after compaction: 34), H = 80 = 2 H steps of 64 (masked tail),
    # V = 1100 = 3 tiles of 512 over 2 V splits (the combine kernel merges them); split backward: 3 V chunks
    # of 512 (the last 76 wide: ragged in its 256-wide tiles and in the gradient products' K), the grad_h
    # accumulator updated twice, the gather / scatter of the compacted rows
    hidden, weight, b, labels = _linear_inputs(40, 80, 1100, dtype, bias=bias, ignore_every=7)
    gh, gw, gb = _linear_check(hidden, weight, b, labels)
    assert torch.equal(gh[::7], torch.zeros_like(gh[::7]))  # ignored rows: no gradient


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
def test_linear_token_logprobs_partial_grads(need, bwd_variant):
    # H = 64: a multiple of the H blocks (the unmasked EVEN_H path)
    hidden, weight, b, labels = _linear_inputs(20, 64, 300, torch.float32)
    _linear_check(hidden, weight, b, labels, need=need)


def test_linear_token_logprobs_many_splits(monkeypatch):
    monkeypatch.setitem(T_linear_cfg.INTERPRET_FWD, "BLOCK_V", 64)
    monkeypatch.setattr(T_linear_cfg, "INTERPRET_SPLITS", 5)
    hidden, weight, b, labels = _linear_inputs(3, 16, 700, torch.float32)
    _linear_check(hidden, weight, b, labels, need=(True, False, False))


def test_linear_token_logprobs_single_row_large_magnitude():
    # logits of magnitude ~1e4: the error bound is PyTorch's own fp32 error on the same inputs
    hidden, weight, b, labels = _linear_inputs(1, 64, 500, torch.float32, scale=4e3)
    logp, lse = T.linear_token_logprobs_fwd(hidden, weight, b, labels, -100, 1024)
    assert lse.abs().max() > 5e3
    _linear_check(hidden, weight, b, labels)


def test_linear_token_logprobs_all_ignored():
    hidden, weight, b, labels = _linear_inputs(5, 16, 100, torch.float32)
    labels[:] = -100
    logp, lse = T.linear_token_logprobs_fwd(hidden, weight, b, labels, -100, 1024)
    assert torch.equal(logp, torch.zeros(5, device=DEVICE)) and torch.equal(lse, torch.zeros(5, device=DEVICE))
    gh, gw, gb = T.linear_token_logprobs_bwd(torch.ones(5, device=DEVICE), hidden, weight, b, labels, lse, -100,
                                             1024, True, True, True)
    for t in (gh, gw, gb):
        assert torch.equal(t, torch.zeros_like(t))


def test_linear_token_logprobs_vocab_128256(monkeypatch, bwd_variant):
    cfg = T_linear_cfg
    for blocks in (cfg.INTERPRET_FWD, cfg.INTERPRET_BWD):  # wide in V, H = 16 exactly
        monkeypatch.setitem(blocks, "BLOCK_V", 1024)
        monkeypatch.setitem(blocks, "BLOCK_H", 16)
    monkeypatch.setitem(cfg.INTERPRET_BWD, "BLOCK_HB", 16)
    # split backward: 2 chunks of 65536 (the last 62720 wide), each product in tiles shaped to it
    monkeypatch.setattr(cfg, "INTERPRET_CHUNK_V", 65536)
    monkeypatch.setattr(cfg, "INTERPRET_DLOGITS", {"BLOCK_N": 16, "BLOCK_V": 4096, "BLOCK_H": 16, "GROUP_N": 4})
    monkeypatch.setattr(cfg, "INTERPRET_MM_DW", {"BLOCK_M": 4096, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})
    monkeypatch.setattr(cfg, "INTERPRET_MM_DH", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 4096, "GROUP_M": 4})
    hidden, weight, b, labels = _linear_inputs(3, 16, 128256, torch.bfloat16, ignore_every=3)
    labels[1] = 128255
    _linear_check(hidden, weight, b, labels, need=(True, True, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_split_backward_one_chunk_no_ignored_rows(monkeypatch, dtype):
    """Split backward with one V chunk (grad_h written straight in the hidden dtype, no accumulator) and
    no ignored row (no gather / scatter); N = 37 and V = 700 are multiples of no block."""
    monkeypatch.setattr(T_linear_cfg, "INTERPRET_CHUNK_V", 4096)
    monkeypatch.setitem(T_linear_cfg.INTERPRET_MM_DW, "BLOCK_K", 32)  # K = 37 rows: a ragged K tail for grad_W
    hidden, weight, b, labels = _linear_inputs(37, 48, 700, dtype)
    _linear_check(hidden, weight, b, labels, need=(True, True, True))


def test_linear_split_backward_many_chunks_matches_atomic():
    """Chunks narrower than a tile row (V = 300 in 5 chunks of 64): the split and atomic variants agree
    (both fp32, to rounding), the split one is bitwise reproducible, and ignored rows get exact zeros."""
    hidden, weight, b, labels = _linear_inputs(21, 32, 300, torch.float32, ignore_every=4)
    logp, lse = T.linear_token_logprobs_fwd(hidden, weight, b, labels, -100, 1024)
    g = torch.randn(21, device=DEVICE)
    args = (g, hidden, weight, b, labels, lse, -100, 1024, True, True, True)
    atomic = T_linear.backward(*args, variant="atomic")
    old = T_linear_cfg.INTERPRET_CHUNK_V
    try:
        T_linear_cfg.INTERPRET_CHUNK_V = 64
        split = T_linear.backward(*args, variant="split")
        again = T_linear.backward(*args, variant="split")
    finally:
        T_linear_cfg.INTERPRET_CHUNK_V = old
    for a, s_, s2 in zip(atomic, split, again):
        assert torch.equal(s_, s2)
        torch.testing.assert_close(s_, a, rtol=1e-5, atol=1e-6)
    assert torch.equal(split[0][::4], torch.zeros_like(split[0][::4]))
    _linear_check(hidden, weight, b, labels)  # and against float64 (default chunking)


def test_linear_bwd_variant_choice(monkeypatch):
    monkeypatch.delenv("LPC_TRITON_LINEAR_BWD", raising=False)
    assert T_linear.bwd_variant() == T_linear.DEFAULT_BWD_VARIANT == "split"
    monkeypatch.setenv("LPC_TRITON_LINEAR_BWD", "Atomic")
    assert T_linear.bwd_variant() == "atomic"
    assert T_linear.bwd_variant("split") == "split"
    monkeypatch.setenv("LPC_TRITON_LINEAR_BWD", "fast")
    with pytest.raises(ValueError, match="LPC_TRITON_LINEAR_BWD"):
        T_linear.bwd_variant()


def test_linear_gpu_config_lists(monkeypatch):
    """The GPU config lists (not run here): Hopper-sized, pruned by dtype family and shared memory; with
    LPC_TRITON_AUTOTUNE=0, one config per dtype that fits (the quick lists)."""
    from lpc_kernels.triton import _common as TC

    cfg = T_linear_cfg
    families = ((cfg.FWD_CONFIGS, cfg.FWD_CONFIGS_F64, cfg.FWD_QUICK, cfg.recompute_smem, "h_ptr"),
                (cfg.DLOGITS_CONFIGS, cfg.DLOGITS_CONFIGS_F64, cfg.DLOGITS_QUICK, cfg.recompute_smem, "h_ptr"),
                (cfg.MM_CONFIGS, cfg.MM_CONFIGS_F64, cfg.MM_QUICK, cfg.mm_smem, "a_ptr"),
                (cfg.BWD_CONFIGS, cfg.BWD_CONFIGS_F64, cfg.BWD_QUICK, cfg.recompute_smem, "h_ptr"))

    def prune(configs, f64_configs, smem, dtype, ptr):
        t = torch.empty(1, dtype=dtype)
        return cfg.prune_by_dtype(f64_configs, smem, ptr)["early_config_prune"](configs, {ptr: t})

    monkeypatch.setattr(cfg, "AUTOTUNE", False)
    for configs, f64, quick, smem, ptr in families:  # bf16, then fp32, then fp64 in the quick lists
        # two-entry lists: fp32 fits the bf16 config
        wants = (quick[0], quick[1], quick[2]) if len(quick) == 3 else (quick[0], quick[0], quick[1])
        for dtype, want in zip((torch.bfloat16, torch.float32, torch.float64), wants):
            assert prune(quick, f64, smem, dtype, ptr) == [want], (dtype, want)
    monkeypatch.setattr(cfg, "AUTOTUNE", True)
    for configs, f64, quick, smem, ptr in families:
        bf16 = prune(configs + f64, f64, smem, torch.bfloat16, ptr)
        fp32 = prune(configs + f64, f64, smem, torch.float32, ptr)
        fp64 = prune(configs + f64, f64, smem, torch.float64, ptr)
        assert 6 <= len(bf16) <= 10 and all(c not in f64 for c in bf16)
        assert 1 <= len(fp32) <= len(bf16) and all(c not in f64 for c in fp32)
        assert fp64 and all(c in f64 for c in fp64)
        for c, elem in [(c, 2) for c in bf16] + [(c, 4) for c in fp32] + [(c, 8) for c in fp64]:
            assert smem(c, elem) <= TC.smem_limit(), c
            assert c.num_warps in (4, 8) or c in f64
    assert TC.prune_smem(cfg.mm_smem, limit=1)(cfg.MM_CONFIGS, {}, 2)  # never empty
    # the split backward's V chunks: <= 2**27 entries of D, on 256-column edges, never below 1024 columns
    monkeypatch.setattr(T_linear_split, "INTERPRET", False)
    assert T_linear_split._chunk_v(16384, 128256) == 8192
    assert T_linear_split._chunk_v(4096, 128256) == 32768
    assert T_linear_split._chunk_v(10**6, 128256) == 1024
    assert T_linear_split._chunk_v(100, 32000) == 32000


_AUTOTUNE_LOG_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from lpc_kernels.triton import linear_token_logprobs as T_linear
h = torch.randn(5, 16); w = torch.randn(40, 16); b = torch.randn(40); lab = torch.tensor([1, 2, -100, 39, 0])
logp, lse = T_linear.linear_token_logprobs_fwd(h, w, b, lab, -100, 1024)
T_linear.backward(torch.ones(5), h, w, b, lab, lse, -100, 1024, True, True, True, variant="split")
T_linear.backward(torch.ones(5), h, w, b, lab, lse, -100, 1024, True, True, True, variant="atomic")
"""


def test_autotune_log(tmp_path):
    """LPC_TRITON_AUTOTUNE_LOG=<path>: at exit, {kernel: [{key, config}]} for every key each tuned kernel
    ran with (under the interpreter: one config, the block sizes passed at launch)."""
    import json
    import os
    import subprocess
    import sys

    if not INTERPRETED:
        pytest.skip("the interpreter's one-config autotuners; on the GPU the benchmarks record the sweeps")
    root = str(REPO)
    path = tmp_path / "sub" / "autotune.json"
    env = dict(os.environ, LPC_TRITON_AUTOTUNE_LOG=str(path), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _AUTOTUNE_LOG_SCRIPT, root], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    assert not list(path.parent.glob(".autotune-*"))  # the temporary file was renamed, not left behind
    kernels = data["kernels"]
    assert {"_lin_fwd_kernel", "_lin_dlogits_kernel", "_mm_kernel", "_lin_bwd_kernel"} <= set(kernels)
    fwd = kernels["_lin_fwd_kernel"]
    assert len(fwd) == 1 and fwd[0]["key"] == [40, 16, "torch.float32", "torch.float32", "torch.float32",
                                                "torch.int64", "torch.int64", "torch.float32", "torch.float32"]
    assert fwd[0]["config"]["kwargs"] == T_linear_cfg.INTERPRET_FWD
    assert {"num_warps", "num_stages"} <= set(fwd[0]["config"])
    mm_keys = {tuple(r["key"][:4]) for r in kernels["_mm_kernel"]}  # (M bucket, N, K bucket, ACCUM)
    assert mm_keys == {(64, 16, 4, False), (4, 16, 64, False)}  # grad_W (one chunk) and grad_h
    for recs in kernels.values():
        for r in recs:
            assert r["config"]["kwargs"] and all(k.isupper() for k in r["config"]["kwargs"])
    # in process: the same records, written on demand (atomically)
    from lpc_kernels.triton import autotune_log

    out = autotune_log.write_autotune_log(str(tmp_path / "now.json"))
    assert json.loads((tmp_path / "now.json").read_text()) == json.loads(json.dumps(out))


# ------------------------------------------------------------------------------------- gumbel_softmax
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax(dtype, hard):
    b, k, d = 20, 37, 300  # 2 row blocks of 16, D = 2 tiles of 256
    logits = (torch.randn(b, k, device=DEVICE) * 2).to(dtype)
    codebook = torch.randn(k, d, device=DEVICE).to(dtype)
    seed, offset, tau = 2**40 + 3, 2**32 - 100, 0.7  # counters cross the 32-bit word boundary
    w, z, soft = T.gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset)
    w_ref, z_ref, soft_ref = R.gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset)
    cdt = compute_dtype(logits)
    assert w.dtype == cdt and z.dtype == dtype and (soft is None) == (not hard)
    if hard:  # the same codes, exactly
        assert torch.equal(w, w_ref)
        torch.testing.assert_close(soft, soft_ref, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-6)
    z_truth = (w_ref.double() @ codebook.double())
    check(z, z_truth, z_ref, rtol=1e-5, atol=1e-5 * z_truth.abs().max().item(), what="z")
    gw = torch.randn(b, k, device=DEVICE, dtype=cdt)
    gz = torch.randn(b, d, device=DEVICE).to(dtype)
    g_logits, g_code = T.gumbel_softmax_bwd(gw, gz, w, soft, codebook, tau, True, True)
    # the reference backward on float64 copies of the *same* forward state
    t_logits, t_code = R.gumbel_softmax_bwd(gw.double(), gz.double(), w.double(), d64(soft), codebook.double(), tau,
                                            True, True)
    s_logits, s_code = R.gumbel_softmax_bwd(gw, gz, w, soft, codebook, tau, True, True)
    assert g_logits.dtype == cdt and g_code.dtype == dtype
    check(g_logits, t_logits, s_logits, rtol=1e-5, atol=1e-6 * t_logits.abs().max().item(), what="grad logits")
    check(g_code, t_code, s_code, rtol=1e-5, atol=grad_atol(dtype, t_code), what="grad codebook")
    only_code = T.gumbel_softmax_bwd(gw, gz, w, soft, codebook, tau, False, True)
    assert only_code[0] is None and torch.equal(only_code[1], g_code)
    only_logits = T.gumbel_softmax_bwd(gw, gz, w, soft, codebook, tau, True, False)
    assert only_logits[1] is None and torch.equal(only_logits[0], g_logits)


def test_gumbel_many_codes_one_row():
    logits, codebook = torch.randn(1, 1024, device=DEVICE), torch.randn(1024, 16, device=DEVICE)
    for seed in (0, 1, 2**63 - 1):
        w, z, soft = T.gumbel_softmax_fwd(logits, codebook, 1.0, True, seed, 0)
        w_ref, z_ref, soft_ref = R.gumbel_softmax_fwd(logits, codebook, 1.0, True, seed, 0)
        assert torch.equal(w, w_ref) and torch.equal(z, z_ref)  # z is exactly the chosen code
        torch.testing.assert_close(soft, soft_ref, rtol=0, atol=1e-6)


def test_gumbel_too_many_codes_is_a_clear_error():
    k = T_gumbel.MAX_K + 1
    with pytest.raises(ValueError, match=f"K = {T_gumbel.MAX_K}"):
        T.gumbel_softmax_fwd(torch.zeros(1, k, device=DEVICE), torch.zeros(k, 1, device=DEVICE), 1.0, False, 0, 0)


# ------------------------------------------------------------------------------------ preference_loss
def _pref_args(loss_type, b, k, dtype, kl=True, ipo_average=True, label_smoothing=None):
    """``(PreferenceLossInputs, PreferenceLossOptions)`` of one random case."""
    pc, pr, rc, rr = ((torch.randn(b, device=DEVICE) * 8 - 30).to(dtype) for _ in range(4))
    cl = torch.randint(1, 60, (b,), device=DEVICE)
    rl = torch.randint(1, 60, (b,), device=DEVICE).to(torch.float32)  # float lengths are allowed
    prior = (torch.randn(b, k, device=DEVICE) * 2).to(dtype) if kl else None
    post = (torch.randn(b, k, device=DEVICE) * 3).to(dtype) if kl else None
    if loss_type == "simpo":
        rc = rr = None
    beta = {"dpo": 0.1, "ipo": 0.3, "simpo": 2.0}[loss_type]
    gamma = 0.5 if loss_type == "simpo" else 0.0
    eps = 0.0 if loss_type == "ipo" else (0.1 if label_smoothing is None else label_smoothing)
    return (PreferenceLossInputs(pc, pr, rc, rr, cl, rl, prior, post),
            PreferenceLossOptions(loss_type, beta, gamma, eps, 0.05 if kl else 0.0, ipo_average))


def _pref_check(case, rtol=1e-5):
    inputs, options = case
    dtype = inputs.policy_chosen_logps.dtype
    tol = 1e-12 if dtype == torch.float64 else rtol
    inputs64 = PreferenceLossInputs(*[d64(t) for t in inputs])
    ours = T.preference_loss_fwd(inputs, options)
    truth = R.preference_loss_fwd(inputs64, options)
    same = R.preference_loss_fwd(inputs, options)
    for name in PreferenceLossOutput._fields:
        o = getattr(ours, name)
        assert o.dtype == compute_dtype(inputs.policy_chosen_logps), name
        check(o, getattr(truth, name), getattr(same, name), rtol=tol, atol=tol, what=name)
    b = inputs.policy_chosen_logps.shape[0]
    cdt = ours.loss.dtype
    gs = PreferenceLossOutput(torch.randn((), device=DEVICE, dtype=cdt),
                              *[torch.randn(b, device=DEVICE, dtype=cdt) for _ in range(4)])
    grads = T.preference_loss_bwd(gs, inputs, options)
    g_truth = R.preference_loss_bwd(PreferenceLossOutput(*[g.double() for g in gs]), inputs64, options)
    g_same = R.preference_loss_bwd(gs, inputs, options)
    for name in PreferenceLossInputs._fields:
        o, t, inp = getattr(grads, name), getattr(g_truth, name), getattr(inputs, name)
        if inp is None or name in ("chosen_lengths", "rejected_lengths"):
            assert o is None, name
            continue
        assert o.dtype == inp.dtype, name
        check(o, t, getattr(g_same, name), rtol=tol, atol=max(grad_atol(dtype, t), tol), what=f"grad {name}")


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_preference_loss(loss_type, dtype):
    # B = 300: 3 programs under the interpreter (the last-program reduction of the mean), K = 40 (masked tile)
    _pref_check(_pref_args(loss_type, 300, 40, dtype))


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_preference_loss_without_kl_and_variants(loss_type):
    _pref_check(_pref_args(loss_type, 7, 1, torch.float32, kl=False))
    _pref_check(_pref_args(loss_type, 1, 3, torch.float32))  # B = 1
    if loss_type == "ipo":
        _pref_check(_pref_args(loss_type, 50, 8, torch.float32, ipo_average=False))
    else:
        _pref_check(_pref_args(loss_type, 50, 8, torch.float32, label_smoothing=0.0))


def test_preference_loss_streamed_codes(monkeypatch):
    monkeypatch.setattr(T_pref, "MAX_TILE_K", 64)  # K = 600 > 64: the streamed path, 3 chunks of 256
    for loss_type in ("dpo", "simpo"):
        _pref_check(_pref_args(loss_type, 9, 600, torch.float32))


def test_preference_loss_extreme_margins():
    # |h| up to ~1e3: logsigmoid and sigmoid stay finite and accurate (no overflow, no 1 - 1 cancellation)
    b = 64
    pc = torch.linspace(-5e3, 5e3, b, device=DEVICE)
    pr, rc, rr = torch.zeros(b, device=DEVICE), torch.zeros(b, device=DEVICE), torch.zeros(b, device=DEVICE)
    for label_smoothing in (0.05, 0.0):
        _pref_check((PreferenceLossInputs(pc, pr, rc, rr),
                     PreferenceLossOptions("dpo", beta=0.2, label_smoothing=label_smoothing)))


# ----------------------------------------------------------------- public ops: autograd, opcheck, compile
def test_public_api_autograd_matches_reference():
    x = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, -100, 49], device=DEVICE)
    h = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 8, device=DEVICE, requires_grad=True)
    lg = torch.randn(3, 6, device=DEVICE, requires_grad=True)
    cb = torch.randn(6, 8, device=DEVICE, requires_grad=True)

    def step(backend):
        tok = lk.token_logprobs(x * 1.0, labels, backend=backend, inplace_backward=True)
        weights, z = lk.gumbel_softmax_codes(lg, cb, tau=0.5, hard=True, seed=11, offset=5, backend=backend)
        lin = lk.linear_token_logprobs(h + z, w, labels, backend=backend)
        out = lk.preference_loss(tok, lin, tok.detach() * 0.5, lin.detach() * 0.5, prior_logits=lg,
                                 posterior_logits=lg * 2, kl_weight=0.1, label_smoothing=0.1, backend=backend)
        return out.loss + weights.square().sum()

    results = []
    for backend in ("triton", "reference"):
        loss = step(backend)
        grads = torch.autograd.grad(loss, (x, h, w, lg, cb))
        results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(INTERPRETED, reason="under the interpreter tests/ops/test_*.py::test_opcheck[triton] run these "
                                         "cases")
def test_opcheck_triton_ops():
    for op, args in public_op_cases("triton", DEVICE):
        opcheck(op, args)


def test_torch_compile_fullgraph_triton():
    torch._dynamo.reset()
    dev = dict(device=DEVICE)
    x = torch.randn(4, 33, **dev, requires_grad=True)
    labels = torch.tensor([0, 32, -100, 5], **dev)
    h, w = torch.randn(4, 8, **dev, requires_grad=True), torch.randn(33, 8, **dev, requires_grad=True)
    lg, cb = torch.randn(4, 6, **dev, requires_grad=True), torch.randn(6, 8, **dev, requires_grad=True)
    ref_c, ref_r = torch.randn(4, **dev), torch.randn(4, **dev)
    lengths = torch.tensor([3, 4, 5, 6], **dev)

    def step(x, h, w, lg, cb):
        tok = lk.token_logprobs(x * 1.0, labels, backend="triton", inplace_backward=True)
        weights, z = lk.gumbel_softmax_codes(lg, cb, hard=True, seed=5, backend="triton")
        lin = lk.linear_token_logprobs(h + z, w, labels, backend="triton")
        out = lk.preference_loss(tok, lin, ref_c, ref_r, chosen_lengths=lengths, rejected_lengths=lengths,
                                 prior_logits=lg, posterior_logits=lg * 2, kl_weight=0.1, loss_type="ipo",
                                 backend="triton")
        return out.loss + out.chosen_rewards.sum() + weights.sum()

    compiled = torch.compile(step, fullgraph=True)
    args = (x, h, w, lg, cb)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, args)
    expected = step(*args)
    expected_grads = torch.autograd.grad(expected, args)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)
