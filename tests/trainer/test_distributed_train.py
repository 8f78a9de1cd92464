"""Data-parallel training (``lpc.distributed``, ``python -m lpc.train --strategy ddp|fsdp2``): DDP and FSDP2
on 2 CPU processes (gloo) against one process.

Unit level: every multi-process case runs in ONE spawned 2-rank job (process start-up and imports dominate
the cost), rendezvous through a FileStore in a tmp dir (no ports), bounded by a timeout (a hang fails the
tests, it never blocks CI). Each rank builds the same tiny LPC model twice from one seed: a plain copy that
does what ONE process does on the whole global batch, and a DDP / FSDP2 copy that takes this rank's slice;
gradients, parameters after AdamW steps, optimizer state, gathered metrics and held-out evaluation must
match, in float64, to ``RUN_TOL`` (``tests.helpers.runs``: the bound for sums taken in another order). Each rank writes every case's verdict to a JSON file; one pytest test per case
reads them. Checks that need no other rank run in this process.

End to end: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m lpc.train --strategy ddp``
(and ``fsdp2``) on a tiny model must reproduce the 1-process run's metrics.jsonl, eval.jsonl and eval.json
(same global batch, ``--dtype float64``, to ``RUN_TOL``; the 1-process run uses 2 threads, the ranks 1); a checkpoint saved at world size 2 resumes in one plain process and
continues exactly as the 1-process run; a rank that raises stops the whole job with its error shown.
Every subprocess runs in its own session under a timeout, and is killed with its children past it.
"""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lpc import distributed as D
from lpc.config import ConfigError, LPCConfig
from lpc.data import PreferenceCollator, TokenizedPair
from lpc.runtime import resolve_device
from tests.helpers import REPO
from tests.helpers.runs import FLOAT64_ARGS, RUN_TOL
from tests.helpers.spawned_jobs import check_verdict, run_cases, run_job

WORLD = 2
JOB_TIMEOUT_S = 180  # the whole spawned job, start-up included
GLOO_TIMEOUT_S = 60  # a desynchronised collective inside the job errors instead of waiting forever
GLOBAL_BATCH = 8
TOL = dict(rtol=RUN_TOL, atol=RUN_TOL)  # float64 models: the ranks' half-batch sums differ from one sum in order only


# ------------------------------------------------------------------------------------------ fixtures
class _Tok:
    """What ``build_tiny_llama`` reads from a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return 48


def _model(seed=0, lpc=True, dtype=torch.float64):
    from lpc.hf import build_tiny_llama
    from lpc.model import LPCModel

    policy = build_tiny_llama(_Tok(), hidden_size=16, num_layers=2, num_heads=2, seed=seed)
    torch.manual_seed(seed + 1)  # the codebook and heads
    cfg = LPCConfig(num_codes=4, head_hidden=8, prior_mix="linear") if lpc else None
    return LPCModel(policy, cfg, backend="auto").to(dtype)


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, 48, (k,), generator=g).tolist()

    return [TokenizedPair(prompt=[1] + toks(1, 5), chosen=toks(1, 5) + [2], rejected=toks(1, 5) + [2],
                          source=int(torch.randint(0, 3, (1,), generator=g)), index=i) for i in range(n)]


LR = 1e-2


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


def _loss(model_call, lpc_model, batch, step, first_index, global_batch):
    """SimPO + KL on one (micro-)batch with the Gumbel offsets of its examples' GLOBAL indices."""
    from lpc.losses import LossConfig, preference_objective

    offset, prior_offset = lpc_model.gumbel_offsets(step, global_batch, first_index)
    out = model_call(batch, mix=0.5, seed=1234, offset=offset, prior_offset=prior_offset)
    res = preference_objective(out, None, None, LossConfig(loss_type="simpo", kl_weight=0.05, backend="auto"))
    return out, res


def _assert_close(a, b, what):
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.dtype == b.dtype == torch.float64, (what, a.dtype, b.dtype)  # RUN_TOL is a float64 bound
    if not torch.allclose(a, b, **TOL):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3e}")


def _assert_close_after_adam(a, b, what, lr, steps, max_fraction=1e-3):
    """``_assert_close`` for weights after ``steps`` AdamW steps, except for at most ``max_fraction`` of the entries,
    which must stay within ``2 * lr * steps``: AdamW's normalised step ``lr * m / (sqrt(v) + eps)`` is at most about
    ``lr`` whatever the gradient, and where a coordinate's gradient cancels to its rounding level it turns the two
    runs' rounding (float32 inside HF's RMSNorm even in a float64 model) into opposite steps of up to ``lr``."""
    a, b = a.detach().cpu(), b.detach().cpu()
    off = ~torch.isclose(a, b, **TOL)
    if int(off.sum()) > max_fraction * a.numel() or bool(((a - b).abs()[off] > 2 * lr * steps).any()):
        raise AssertionError(f"{what}: {int(off.sum())} of {a.numel()} entries differ by more than {TOL}, max abs "
                             f"diff {(a - b).abs().max().item():.3e} (lr {lr}, {steps} steps)")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------------------------- cases
def _case_reductions(ctx, tmp):
    r = ctx.rank
    rows = D.gather_rows(torch.arange(3 + r, dtype=torch.float32) + 10 * r, ctx)  # sizes 3 and 4
    assert rows.tolist() == [0, 1, 2, 10, 11, 12, 13], rows
    assert D.gather_rows(None, ctx) is None
    assert D.all_reduce_scalar(r + 1.0, ctx, "sum") == 3.0
    assert D.all_reduce_scalar(r + 1.0, ctx, "mean") == 1.5
    assert D.all_reduce_scalar(r + 1.0, ctx, "max") == 2.0
    # rank 0: mean 1.0 over 1 example, rank 1: mean 4.0 over 3 examples -> (1 + 12) / 4
    assert D.weighted_mean(1.0 if r == 0 else 4.0, 1 if r == 0 else 3, ctx) == 13 / 4
    obj = SimpleNamespace(v=torch.full((2,), float(r)), m=torch.tensor(float(r)), n=5, none=None, flag=True)
    got = D.gather_fields(obj, ctx)
    assert got.v.tolist() == [0, 0, 1, 1] and float(got.m) == 0.5 and got.n == 10 and got.none is None and got.flag
    assert D.broadcast_object({"dir": f"runs/{r}"}, ctx) == {"dir": "runs/0"}
    order = os.path.join(tmp, "order.txt")
    with D.main_first(ctx):
        with open(order, "a") as f:
            f.write(f"{r}\n")
    D.barrier(ctx)
    assert open(order).read().split() == ["0", "1"], open(order).read()


def _compare_step(ctx, strategy, accum=1, layout="padded"):
    """Two AdamW steps: the plain model on the global batch (padded) vs the wrapped one on this rank's slice (in
    ``layout``)."""
    from lpc.losses import step_metrics

    assert ctx.strategy == strategy
    collate, collate_rank = PreferenceCollator(0), PreferenceCollator(0, layout)
    plain, wrapped = _model(), _model()
    plain_opt = _optimizer(plain)
    call = D.wrap_model(wrapped, ctx, find_unused_parameters=False)
    opt = _optimizer(wrapped)  # after wrapping: FSDP2 replaced the parameters with sharded ones
    local = D.rank_slice(GLOBAL_BATCH, ctx.rank, ctx.world_size)
    per = (local.stop - local.start) // accum
    for step in range(2):
        pairs = _pairs(GLOBAL_BATCH, seed=step)
        # one process: the whole global batch in one micro-batch
        plain_opt.zero_grad()
        out1, res1 = _loss(plain, plain, collate(pairs), step, 0, GLOBAL_BATCH)
        res1.loss.backward()
        norm1 = D.clip_grad_norm(plain.parameters(), 1.0)
        plain_opt.step()
        # this rank: its slice, in `accum` micro-batches, first index = the global index of its first pair
        opt.zero_grad()
        outs, losses = [], []
        for j in range(accum):
            first = local.start + j * per
            with D.set_gradient_sync(call, j == accum - 1):
                out, res = _loss(call, wrapped, collate_rank(pairs[first:first + per]), step, first, GLOBAL_BATCH)
                (res.loss / accum).backward()
            outs.append(out)
            losses.append(res)
        norm = D.clip_grad_norm(wrapped.parameters(), 1.0)
        opt.step()
        assert abs(norm - norm1) <= RUN_TOL * max(1.0, norm1), (norm, norm1)
        # the step metrics on the gathered global batch are the 1-process ones
        if accum == 1:
            g_out, g_res = D.gather_fields(outs[0], ctx), D.gather_fields(
                SimpleNamespace(loss=losses[0].loss.detach(), chosen_rewards=losses[0].chosen_rewards.detach(),
                                rejected_rewards=losses[0].rejected_rewards.detach(), kl=losses[0].kl.detach()), ctx)
            m, m1 = step_metrics(g_out, g_res), step_metrics(out1, res1)
            for k in m1:
                assert abs(m[k] - m1[k]) <= RUN_TOL * max(1.0, abs(m1[k])), (k, m[k], m1[k])
            _assert_close(g_out.code_weights, out1.code_weights, "Gumbel code weights (global batch)")
    sd = D.full_state_dict(call, ctx)
    if ctx.is_main:
        ref = plain.state_dict()
        assert sorted(sd) == sorted(ref), (sorted(set(sd) ^ set(ref)))
        for k in ref:
            _assert_close_after_adam(sd[k], ref[k], f"parameter {k} after 2 steps", LR, 2)
    return plain, plain_opt, wrapped, opt


def _case_ddp(ctx, tmp):
    _compare_step(ctx, "ddp")


def _case_ddp_accum(ctx, tmp):
    _compare_step(ctx, "ddp", accum=2)


def _case_ddp_shared_prompt(ctx, tmp):
    _compare_step(ctx, "ddp", layout="shared-prompt")


def _case_fsdp2_packed_accum(ctx, tmp):
    _compare_step(ctx, "fsdp2", accum=2, layout="packed")


def _case_fsdp2_accum(ctx, tmp):
    _compare_step(ctx, "fsdp2", accum=2)


def _case_fsdp2_state_roundtrip(ctx, tmp):
    """FSDP2 = one process over two AdamW steps (``_compare_step``); the full optimizer state gathered from
    FSDP2 = the 1-process optimizer's; loading full states into a fresh sharded model + optimizer and stepping
    again matches one more 1-process step (resume across world sizes, both ways)."""
    plain, plain_opt, wrapped, opt = _compare_step(ctx, "fsdp2")  # (compares the full model state too)
    full_opt = D.full_optimizer_state_dict(opt, ctx)
    if ctx.is_main:
        ref = plain_opt.state_dict()
        assert sorted(full_opt["state"]) == sorted(ref["state"])
        for pid, st in ref["state"].items():
            for name, v in st.items():
                got = torch.as_tensor(full_opt["state"][pid][name])
                if name == "step":  # a counter
                    assert torch.equal(got, torch.as_tensor(v)), (pid, got, v)
                else:
                    _assert_close(got, torch.as_tensor(v), f"optim {pid}/{name}")
        assert full_opt["param_groups"] == ref["param_groups"]
    # resume at world size 2 from the 1-process states (every rank reads the same files in the trainer)
    fresh = _model(seed=7)  # different weights: everything must come from the loaded state
    call = D.wrap_model(fresh, ctx)
    fresh_opt = _optimizer(fresh)
    fresh.load_state_dict(D.shard_state_dict(plain.state_dict(), fresh))
    fresh_opt.load_state_dict(D.shard_optimizer_state_dict(plain_opt.state_dict(), fresh_opt))
    collate = PreferenceCollator(0)
    pairs = _pairs(GLOBAL_BATCH, seed=2)
    local = D.rank_slice(GLOBAL_BATCH, ctx.rank, ctx.world_size)
    for model, optim, fn, batch, first in ((plain, plain_opt, plain, pairs, 0),
                                           (fresh, fresh_opt, call, pairs[local], local.start)):
        optim.zero_grad()
        _, res = _loss(fn, model, collate(batch), 2, first, GLOBAL_BATCH)
        res.loss.backward()
        optim.step()
    after = D.full_state_dict(fresh, ctx)
    if ctx.is_main:
        for k, v in plain.state_dict().items():
            _assert_close_after_adam(after[k], v, f"parameter {k} after the resumed step", LR, 3)


def _case_fsdp2_bf16(ctx, tmp):
    """--dtype bfloat16 under FSDP2: bf16 compute in the body, fp32 sharded masters, fp32 heads; finite and
    close to the fp32 run."""
    collate = PreferenceCollator(0)
    wrapped = _model(dtype=torch.float32)
    plain = _model(dtype=torch.float32)
    D.wrap_model(wrapped, ctx, mixed_precision=torch.bfloat16)
    local = D.rank_slice(GLOBAL_BATCH, ctx.rank, ctx.world_size)
    pairs = _pairs(GLOBAL_BATCH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, res = _loss(wrapped, wrapped, collate(pairs[local]), 0, local.start, GLOBAL_BATCH)
    res.loss.backward()
    assert all(_full(p).dtype == torch.float32 for p in wrapped.parameters())
    assert out.prior_logits.dtype == torch.float32 and out.code_weights.dtype == torch.float32
    loss = D.all_reduce_scalar(res.loss.item(), ctx, "mean")
    _, res1 = _loss(plain, plain, collate(pairs), 0, 0, GLOBAL_BATCH)
    want = res1.loss.item()
    # bf16 rounds each activation by up to 2^-9 relative; through two layers and a mean over pairs a few percent
    # bounds it, while a structural error (a rank's half-batch lost) moves the loss by tens of percent
    assert abs(loss - want) < 0.05 * max(1.0, abs(want)), (loss, want)
    assert all(torch.isfinite(_full(p.grad)).all() for p in wrapped.parameters() if p.grad is not None)


def _eval_case(ctx, strategy):
    """Held-out DPO evaluation split over the ranks (7 pairs: shares 4 and 3, batch 3: 2 and 1 batches, so
    FSDP2 runs a padding batch on rank 1) = one process evaluating everything."""
    from lpc.evaluate import evaluate, evaluate_sharded
    from lpc.losses import LossConfig
    from lpc.objective import make_reference
    from lpc.reference import LiveReference, wrap_reference

    class _Set:
        def __init__(self, pairs):
            self.pairs = pairs

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            return self.pairs[i]

    data = _Set(_pairs(7, seed=11))
    collate = PreferenceCollator(0)
    cfg = LossConfig(loss_type="dpo", kl_weight=0.05, backend="auto")
    plain = _model()
    torch.manual_seed(3)
    with torch.no_grad():  # a reference that differs from the policy: non-zero margins
        for p in plain.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = _model()
    ref_plain = LiveReference(make_reference(base.policy))
    want = evaluate(plain, ref_plain, data, collate, cfg, batch_size=3, source_names=["a", "b", "c"])
    model = _model()
    model.load_state_dict(plain.state_dict())
    ref_model = make_reference(_model().policy)
    if strategy == "fsdp2":
        D.wrap_model(model, ctx)
        ref = wrap_reference(ref_model, ctx)
    else:
        D.wrap_model(model, ctx)  # DDP: evaluation runs the plain module
        ref = LiveReference(ref_model)
    got = evaluate_sharded(model, ref, data, collate, cfg, ctx, batch_size=3, source_names=["a", "b", "c"])
    assert list(got) == list(want), (list(got), list(want))
    for k, v in want.items():
        if isinstance(v, dict):
            assert v.keys() == got[k].keys(), k
            for s in v:
                assert abs(got[k][s] - v[s]) <= RUN_TOL, (k, s, got[k][s], v[s])
        elif isinstance(v, float):
            assert abs(got[k] - v) <= RUN_TOL * max(1.0, abs(v)), (k, got[k], v)
        else:
            assert got[k] == v, (k, got[k], v)


def _case_eval_ddp(ctx, tmp):
    _eval_case(ctx, "ddp")


def _case_eval_fsdp2(ctx, tmp):
    _eval_case(ctx, "fsdp2")


CASES = {name[len("_case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")}


def _run_case(name, fn, out_dir):
    ctx = D.init_distributed("fsdp2" if "fsdp2" in name else "ddp", "cpu")  # takes the group set up in _job
    torch.manual_seed(0)
    fn(ctx, out_dir)


def _job(rank, store_file, out_dir):
    """One rank: every case in order, each verdict 'ok' or its traceback, written as it goes."""
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    sync = D.init_distributed("ddp", "cpu")
    run_cases(rank, out_dir, [(name, functools.partial(_run_case, name, fn, out_dir), None)
                              for name, fn in CASES.items()], after_each=lambda: D.barrier(sync))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_train")
    return run_job(_job, (str(tmp / "store"), str(tmp)), WORLD, JOB_TIMEOUT_S, str(tmp))


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks(job, case):
    check_verdict(job, case)


# ------------------------------------------------------------------- checks that need no other rank
def test_rank_slice_and_split():
    assert [D.rank_slice(8, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ConfigError, match="batch_size: 6 is not divisible by the 4 processes"):
        D.rank_slice(6, 0, 4)
    with pytest.raises(ConfigError, match="eval_batch_size: 3 is not divisible"):
        D.rank_slice(3, 1, 2, what="eval_batch_size")
    with pytest.raises(ValueError, match="rank must be in"):
        D.rank_slice(4, 2, 2)
    shares = [D.split_evenly(7, r, 3) for r in range(3)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4], [5, 6]]
    assert list(D.split_evenly(1, 1, 2)) == []


def test_strategy_none_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="strategy: torchrun started 2 processes but --strategy is none"):
        D.init_distributed("none", "cpu")
    with pytest.raises(ConfigError, match="strategy: must be one of"):
        D.init_distributed("zero3", "cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        D.init_distributed("ddp", "cpu")


def test_explicit_gpu_index_refused_for_several_processes():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda:0' requested but torch sees no CUDA device"):
            resolve_device("cuda:0", 0, 2)
    else:
        with pytest.raises(ConfigError, match="names one GPU but 2 processes run"):
            resolve_device("cuda:0", 0, 2)


def test_one_process_group_without_torchrun(monkeypatch):
    """``--strategy ddp`` started by plain ``python``: a 1-process gloo group (FileStore), destroyed on exit."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    with D.process_group("ddp", "cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed) == (0, 1, "gloo", True)
        assert D.gather_rows(torch.ones(2), ctx).tolist() == [1.0, 1.0]
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="boom"):
        with D.process_group("ddp", "cpu"):
            raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_gumbel_codes_do_not_depend_on_the_world_size():
    """Issue 9 part 3: each example's Gumbel (seed, offset) comes from its GLOBAL index, so the codes drawn
    for a rank's slice (any world size, any micro-batching) are the ones one process draws for the whole
    global batch."""
    torch.manual_seed(0)
    model = _model()
    g, k = GLOBAL_BATCH, model.lpc.num_codes
    post, prior = torch.randn(g, k, dtype=torch.float64), torch.randn(g, k, dtype=torch.float64)
    for step in (0, 3):
        off, poff = model.gumbel_offsets(step, g, 0)
        w_all, z_all, _ = model.latent(prior, post, mix=0.3, seed=99, offset=off, prior_offset=poff)
        for world in (2, 4, 8):
            for r in range(world):
                sl = D.rank_slice(g, r, world)
                off, poff = model.gumbel_offsets(step, g, sl.start)
                w, z, _ = model.latent(prior[sl], post[sl], mix=0.3, seed=99, offset=off, prior_offset=poff)
                torch.testing.assert_close(w, w_all[sl], rtol=0, atol=0)
                # z = w @ E on fewer rows: another GEMM blocking, float64 -> RUN_TOL
                torch.testing.assert_close(z, z_all[sl], rtol=RUN_TOL, atol=RUN_TOL)
    # and a different step draws different codes
    off, poff = model.gumbel_offsets(1, g, 0)
    assert not torch.equal(model.latent(prior, post, mix=0.3, seed=99, offset=off, prior_offset=poff)[0], w_all)


def test_decoder_layers_of_a_llama():
    model = _model()
    from lpc.hf import decoder_layers

    layers = decoder_layers(model.policy)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2


@pytest.mark.distributed
def test_failing_rank_stops_the_job_with_its_error(tmp_path):
    """Under torchrun, rank 1 raises while rank 0 waits in a barrier: the job exits non-zero within the
    timeout, and the output names rank 1 and shows its error."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import torch
        from lpc import distributed as D

        torch.set_num_threads(1)
        with D.process_group("ddp", "cpu") as ctx:
            if ctx.rank == 1:
                raise ValueError("boom from rank 1")
            D.barrier(ctx)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the job hung: no exit within 120 s\n{exc.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "a rank raised but the job exited 0"
    assert "ValueError: boom from rank 1" in out, out[-3000:]
    assert "rank 1 of 2 failed with ValueError: boom from rank 1" in out, out[-3000:]
    assert time.monotonic() - started < 120


# ------------------------------------------------------------------------------------- end to end
E2E_TIMEOUT_S = 150  # one torchrun job (start-up of 3 Python processes included)
E2E_ARGS = ["--steps", "4", "--batch-size", "8", "--eval-size", "16", "--num-train", "64", "--hidden-size", "32",
            "--num-layers", "2", "--num-heads", "2", "--num-codes", "8", "--lr", "1e-2", "--warmup-steps", "1",
            "--threads", "1", "--no-progress", "--save-every", "2", "--eval-every", "2", "--max-length", "64",
            *FLOAT64_ARGS]
E2E_FSDP2_LAYOUT = ["--batch-layout", "packed", "--max-tokens-per-batch", "128"]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _run(cmd, timeout_s=E2E_TIMEOUT_S):
    """Run ``cmd`` in its own session; past ``timeout_s`` kill it and every process it started, and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=str(REPO),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... hung: no exit within {timeout_s} s\n{out[-4000:]}")
    return proc.returncode, out


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _rows(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def _assert_same_run(want_dir, got_dir, tol=RUN_TOL):
    """metrics.jsonl (every step, every key but the timing), eval.jsonl and eval.json agree to ``tol``
    (relative for values above 1 in magnitude, like summed log-probs)."""

    def same(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
            for k in a:
                if k not in ("tokens_per_s", "train_wall_s"):
                    same(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, float):
            assert abs(a - b) <= tol * max(1.0, abs(a)), f"{where}: {b} != {a} (1 process)"
        else:
            assert a == b, f"{where}: {b!r} != {a!r} (1 process)"

    for name in ("metrics.jsonl", "eval.jsonl"):
        want, got = _rows(os.path.join(want_dir, name)), _rows(os.path.join(got_dir, name))
        assert len(got) == len(want), f"{name}: {len(got)} lines, the 1-process run has {len(want)}"
        for a, b in zip(want, got):
            same(a, b, f"{name} step {a['step']}")
    same(json.load(open(os.path.join(want_dir, "eval.json"))), json.load(open(os.path.join(got_dir, "eval.json"))),
         "eval.json")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The 1-process run (in this process) and the 2-process DDP and FSDP2 runs of the same settings."""
    from lpc.train import main

    root = tmp_path_factory.mktemp("dist_e2e")
    cache = str(root / "cache")  # the 1-process run trains the tokenizer; the torchrun jobs read it
    args = E2E_ARGS + ["--cache-dir", cache]
    main(args + ["--output-dir", str(root / "one"), "--threads", "2"])  # another thread count than the ranks'

    jobs = {}
    for strategy in ("ddp", "fsdp2"):
        # FSDP2 in the packed layout, cut into passes by a token budget: the same numbers as the default (auto:
        # shared-prompt) 1-process run
        layout = E2E_FSDP2_LAYOUT if strategy == "fsdp2" else []
        rc, out = _run(_torchrun("-m", "lpc.train", *args, *layout, "--strategy", strategy, "--output-dir",
                                 str(root / strategy)))
        jobs[strategy] = (rc, out)
    return root, jobs


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_run_matches_one_process(e2e, strategy):
    root, jobs = e2e
    rc, out = jobs[strategy]
    assert rc == 0, out[-5000:]
    assert f"{strategy}: 2 process(es), gloo on cpu; 4 of the 8 pairs of each step per rank" in out, out[-3000:]
    assert out.count("held-out preference accuracy") == 1, "rank 1 printed too (or nobody did)"
    _assert_same_run(root / "one", root / strategy)
    steps = [p.name for p in sorted((root / strategy / "checkpoints").iterdir())]
    assert steps == ["step-00000002", "step-00000004"], steps
    # final/ is an ordinary model directory whatever the strategy (FSDP2: gathered to rank 0)
    from safetensors.torch import load_file

    for name in ("model.safetensors", "lpc_heads.safetensors"):
        want, got = load_file(str(root / "one" / "final" / name)), load_file(str(root / strategy / "final" / name))
        assert want.keys() == got.keys()
        for k in want:
            _assert_close_after_adam(got[k], want[k], f"final/{name}: {k}",
                                     lr=float(E2E_ARGS[E2E_ARGS.index("--lr") + 1]),
                                     steps=int(E2E_ARGS[E2E_ARGS.index("--steps") + 1]))


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_checkpoint_saved_at_world_size_2_resumes_at_world_size_1(e2e, tmp_path, strategy):
    """Resume the 2-process run from its step-2 checkpoint in ONE plain process (no --strategy: a resumed run
    does not inherit how the saved one was launched): steps 3-4 and the final evaluation are the 1-process
    run's."""
    from lpc.train import main

    root, jobs = e2e
    assert jobs[strategy][0] == 0, jobs[strategy][1][-3000:]
    run = tmp_path / "run"
    shutil.copytree(root / strategy, run)
    summary = main(["--resume", str(run / "checkpoints" / "step-00000002"), "--output-dir", str(run), "--threads", "1",
                    "--no-progress", "--cache-dir", str(root / "cache")])
    assert summary["resumed_from"].endswith("step-00000002")
    saved = json.load(open(run / "train_config.json"))
    assert saved["strategy"] == "none"
    _assert_same_run(root / "one", run)


@pytest.mark.distributed
def test_failing_rank_stops_the_trainer(tmp_path, e2e):
    """Rank 1 raises in its second training step, while rank 0 goes on into the step's collectives: torchrun
    must end the job non-zero, with rank 1's error and traceback in the output, long before any timeout."""
    root, _ = e2e
    script = tmp_path / "failing_rank.py"
    script.write_text(textwrap.dedent("""
        import os
        import lpc.train as T

        step = T.train_step

        def failing_step(tr, i):
            if i == 1 and os.environ["RANK"] == "1":
                raise RuntimeError("injected failure on rank 1")
            return step(tr, i)

        T.train_step = failing_step
        T._cli()
    """))
    started = time.monotonic()
    rc, out = _run(_torchrun(str(script), *E2E_ARGS, "--cache-dir", str(root / "cache"), "--strategy", "ddp",
                             "--output-dir", str(tmp_path / "run")), timeout_s=120)
    assert rc != 0, "a rank raised but the job exited 0"
    assert "RuntimeError: injected failure on rank 1" in out, out[-4000:]
    assert "rank 1 of 2 failed with RuntimeError: injected failure on rank 1" in out, out[-4000:]
    assert "failing_step" in out, "no traceback shown"
    # torchrun's summary names rank 1 as the root cause (its error file, written by lpc.train's `record`)
    assert re.search(r"Root Cause.*?rank\s*:\s*1 .*?injected failure on rank 1", out, re.S), out[-4000:]
    assert time.monotonic() - started < 120


def test_batch_size_must_split_over_the_processes(tmp_path):
    """Each rank takes an equal slice of the global batch: 6 pairs on 4 processes is an error naming
    --batch-size, raised before any model is built."""
    from lpc.train import setup
    from lpc.config import TrainConfig

    cfg = TrainConfig(batch_size=6, output_dir=str(tmp_path / "run"), num_train=64, eval_size=8, threads=1)
    with pytest.raises(ConfigError, match="batch_size: 6 pairs cannot be split into 4 processes x 1 micro-batches"):
        setup(cfg, D.DistContext(strategy="ddp", world_size=4))
    cfg = TrainConfig(batch_size=8, gradient_accumulation_steps=2, output_dir=str(tmp_path / "run2"), num_train=64)
    with pytest.raises(ConfigError, match="8 pairs cannot be split into 8 processes x 2 micro-batches"):
        setup(cfg, D.DistContext(strategy="ddp", world_size=8))


def test_strategy_flag_and_resume_inheritance():
    from lpc.cli import build_parser
    from lpc.config import RESUME_LAUNCH, TrainConfig

    assert "--strategy" in build_parser().format_help()
    assert "strategy" in TrainConfig.fields_with(RESUME_LAUNCH)
    with pytest.raises(ConfigError, match="strategy: fsdp2 with LoRA"):
        from lpc.config import TrainConfig

        TrainConfig(strategy="fsdp2", lora_r=8)
