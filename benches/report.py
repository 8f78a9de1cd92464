"""Turn pytest-benchmark JSON from ``benches/`` into a markdown report, a CSV and PNG plots.

    python benches/report.py RESULTS.json [MORE.json ...] [--out report.md] [--plots DIR] [--csv FILE]

Several JSON files (e.g. one per bench file, as gpu_check.sh writes them) are merged. The report has:
machine and versions, the issue's targets and where each stands, one table per op and shape (median
time of each mode, peak memory, ratios to the best peer and to eager, the oracle check), the copy-bandwidth
comparison for token_logprobs, the skipped implementations with their reasons, and the method.
Plots (matplotlib, skipped with a note if it is missing): time and peak memory of fwd+bwd against N and V.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict

OP_ORDER = ["linear_token_logprobs", "token_logprobs", "gumbel_softmax_codes", "preference_loss",
            "fused_linear_preference", "train_step", "batch_layout"]
# issue 18, CPU: real tokens/s of each layout over padded's, at equal or lower peak memory
LAYOUT_TARGETS = {"packed": 1.2, "shared_prompt": 1.4}
MODES = ["fwd_bwd", "fwd", "bwd"]
MODE_LABEL = {"fwd_bwd": "fwd+bwd", "fwd": "fwd", "bwd": "bwd"}
PEER_KINDS = ("eager", "compile", "liger", "cce")
ELT = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


# ------------------------------------------------------------------------------------------- loading
def load(paths: list) -> tuple:
    rows, skipped, machines, settings, meta = [], [], [], [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machines.append(data.get("machine_info", {}))
        settings.append(data.get("lpc_settings", {}))
        meta.append({"file": os.path.basename(path), "datetime": data.get("datetime"),
                     "commit": data.get("commit_info", {})})
        skipped += data.get("lpc_skipped", [])
        for b in data.get("benchmarks", []):
            e = b.get("extra_info", {})
            if "op" not in e:
                continue
            s = b["stats"]
            rows.append({**e, "median": s["median"], "min": s["min"], "max": s["max"], "rounds": s["rounds"],
                         "iqr": s.get("iqr", float("nan")), "name": b["name"]})
    return rows, skipped, machines, settings, meta


# ---------------------------------------------------------------------------------------- formatting
def fmt_time(t) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_ratio(r) -> str:
    if r is None or (isinstance(r, float) and (math.isnan(r) or math.isinf(r))):
        return "-"
    return f"{r:.2f}x"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(header: list, body: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- indexing
def family(impl):
    """``lpc`` / ``dpo`` for the end-to-end rows (``ours_lpc``, ``eager_dpo``, ...), else None."""
    tail = impl.rsplit("_", 1)[-1] if impl and "_" in impl else None
    return tail if tail in ("lpc", "dpo") else None


class Index:
    def __init__(self, rows: list):
        self.rows = rows
        self.by = {}
        self.shapes = defaultdict(OrderedDict)  # op -> shape -> first row (dims, dtype, tags)
        self.impls = defaultdict(list)          # (op, shape) -> impl order
        for r in rows:
            key = (r["op"], r["shape"], r["impl"], r["mode"])
            self.by[key] = r
            self.shapes[r["op"]].setdefault(r["shape"], r)
            if r["impl"] not in self.impls[(r["op"], r["shape"])]:
                self.impls[(r["op"], r["shape"])].append(r["impl"])

    def get(self, op, shape, impl, mode):
        return self.by.get((op, shape, impl, mode))

    def time(self, op, shape, impl, mode):
        r = self.get(op, shape, impl, mode)
        return r["median"] if r else None

    def mem(self, op, shape, impl, mode):
        r = self.get(op, shape, impl, mode)
        return r.get("peak_mem_bytes") if r else None

    def eager_of(self, op, shape, impl):
        """The eager baseline of a row: ``eager``, or ``eager_<family>`` for suffixed rows (train_step)."""
        if "eager" in self.impls[(op, shape)]:
            return "eager"
        fam = family(impl)
        return f"eager_{fam}" if fam and f"eager_{fam}" in self.impls[(op, shape)] else None

    def best(self, op, shape, mode, kinds, what="median", like=None):
        """(impl, value) of the smallest ``what`` among rows whose kind is in ``kinds`` (and, when ``like``
        has a family suffix such as ``_lpc``, of that family only)."""
        best = (None, None)
        fam = family(like) if like else None
        for impl in self.impls[(op, shape)]:
            r = self.get(op, shape, impl, mode)
            if not r or r.get("kind") not in kinds or (fam and family(impl) != fam):
                continue
            v = r.get(what)
            if v is not None and (best[1] is None or v < best[1]):
                best = (impl, v)
        return best

    def ops(self):
        known = [o for o in OP_ORDER if o in self.shapes]
        return known + [o for o in self.shapes if o not in known]


# ---------------------------------------------------------------------------------------------- targets
def targets(ix: Index, device: str) -> list:
    """(target, measured, status) rows for the issue's targets that these results can answer."""
    out = []

    def target_shape(op):
        for shape, r in ix.shapes.get(op, {}).items():
            if "target" in (r.get("tags") or []):
                return shape
        return None

    def ours(op, shape, mode="fwd_bwd"):
        return [i for i in ix.impls[(op, shape)] if i.startswith("ours_") and ix.get(op, shape, i, mode)]

    op = "linear_token_logprobs"
    shape = target_shape(op)
    if shape:
        te, me = ix.time(op, shape, "eager", "fwd_bwd"), ix.mem(op, shape, "eager", "fwd_bwd")
        if device == "cpu":
            for impl in ours(op, shape):
                rt = _ratio(ix.time(op, shape, impl, "fwd_bwd"), te)
                rm = _ratio(ix.mem(op, shape, impl, "fwd_bwd"), me)
                ok = rt is not None and rm is not None and rt <= 1.0 and rm <= 0.15
                out.append((f"CPU {op} {shape} fwd+bwd, {impl}: time <= 1.0x eager and peak memory <= 0.15x eager",
                            f"time {fmt_ratio(rt)}, memory {fmt_ratio(rm)}", "met" if ok else "not met"))
        else:
            tc, mc = ix.time(op, shape, "cce", "fwd_bwd"), ix.mem(op, shape, "cce", "fwd_bwd")
            tl = ix.time(op, shape, "liger", "fwd_bwd")
            for impl in ours(op, shape):
                t, m = ix.time(op, shape, impl, "fwd_bwd"), ix.mem(op, shape, impl, "fwd_bwd")
                rc, rl, rm = _ratio(t, tc), _ratio(t, tl), _ratio(m, mc)
                ok = all(v is not None for v in (rc, rl, rm)) and rc <= 1.0 and rl <= 0.67 and rm <= 1.0
                out.append((f"GPU {op} {shape} fwd+bwd, {impl}: time <= 1.0x CCE and <= 0.67x Liger, memory <= CCE",
                            f"{fmt_ratio(rc)} CCE, {fmt_ratio(rl)} Liger, memory {fmt_ratio(rm)} CCE",
                            "met" if ok else ("not met" if None not in (rc, rl, rm) else "incomplete")))
    op = "token_logprobs"
    shape = target_shape(op)
    if shape:
        bw = bandwidth_rows(ix, op, shape)
        for impl, _, _, frac in bw:
            if impl.startswith("ours_") and frac is not None:
                status = ("met" if frac >= 0.85 else "not met") if device == "cuda" else "GPU target (CPU: info)"
                out.append((f"{'GPU' if device == 'cuda' else 'CPU'} {op} {shape} fwd+bwd, {impl}: >= 85% of copy "
                            f"bandwidth", f"{frac * 100:.0f}%", status))
    for op in ("gumbel_softmax_codes", "preference_loss"):
        shape = target_shape(op)
        if not shape:
            continue
        te = ix.time(op, shape, "eager", "fwd_bwd")
        for impl in ours(op, shape):
            speedup = _ratio(te, ix.time(op, shape, impl, "fwd_bwd"))
            status = ("met" if speedup and speedup >= 5 else "not met") if device == "cuda" else \
                "GPU target (CPU: info)"
            out.append((f"{'GPU' if device == 'cuda' else 'CPU'} {op} {shape} fwd+bwd, {impl}: >= 5x eager",
                        f"speedup {speedup:.2f}x" if speedup else "-", status))
    op = "batch_layout"
    shape = target_shape(op)
    if shape and ix.get(op, shape, "padded", "fwd_bwd"):
        tp, mp = ix.time(op, shape, "padded", "fwd_bwd"), ix.mem(op, shape, "padded", "fwd_bwd")
        for impl, want in LAYOUT_TARGETS.items():
            speed, rm = _ratio(tp, ix.time(op, shape, impl, "fwd_bwd")), _ratio(ix.mem(op, shape, impl, "fwd_bwd"), mp)
            ok = speed is not None and rm is not None and speed >= want and rm <= 1.0
            out.append((f"{'GPU' if device == 'cuda' else 'CPU'} {op} {shape}: {impl} real tokens/s >= {want}x padded, "
                        f"peak memory <= padded", f"{fmt_ratio(speed)} tokens/s, memory {fmt_ratio(rm)}",
                        ("met" if ok else "not met") if device == "cpu" else "CPU target (GPU: info)"))
    op = "train_step"
    shape = target_shape(op)
    if shape and ix.get(op, shape, "ours_lpc", "fwd_bwd") and ix.get(op, shape, "eager_lpc", "fwd_bwd"):
        rt = _ratio(ix.time(op, shape, "ours_lpc", "fwd_bwd"), ix.time(op, shape, "eager_lpc", "fwd_bwd"))
        rm = _ratio(ix.mem(op, shape, "ours_lpc", "fwd_bwd"), ix.mem(op, shape, "eager_lpc", "fwd_bwd"))
        ok = rt is not None and rm is not None and rt <= 0.8 and rm <= 0.5
        status = ("met" if ok else "not met") if device == "cuda" else "GPU target (CPU: info)"
        out.append((f"{'GPU' if device == 'cuda' else 'CPU'} {op} {shape}: ours_lpc peak memory <= 0.5x and time <= "
                    f"0.8x eager_lpc", f"time {fmt_ratio(rt)}, memory {fmt_ratio(rm)}", status))
    return out


def bandwidth_rows(ix: Index, op: str, shape: str) -> list:
    """(impl, fwd+bwd time, effective GB/s, fraction of copy bandwidth) for token_logprobs."""
    r0 = ix.shapes[op][shape]
    copy = ix.get(op, shape, "copy", "copy")
    n, v = r0["dims"].get("N"), r0["dims"].get("V")
    elt = ELT.get(r0["dtype"], 4)
    if copy is None or n is None or v is None:
        return []
    copy_bw = copy["bytes_moved"] / copy["median"]
    need = 3 * n * v * elt  # fwd reads the logits, bwd reads them again and writes the gradient
    out = [("copy", copy["median"], copy_bw / 1e9, 1.0)]
    for impl in ix.impls[(op, shape)]:
        t = ix.time(op, shape, impl, "fwd_bwd")
        if t:
            out.append((impl, t, need / t / 1e9, need / t / copy_bw))
    return out


# --------------------------------------------------------------------------------------------- tables
def op_tables(ix: Index, op: str, busy_load: float = float("inf")) -> list:
    lines = []
    for shape, r0 in ix.shapes[op].items():
        impls = [i for i in ix.impls[(op, shape)] if i != "copy"]
        if not impls:
            continue
        tags = f" ({', '.join(r0.get('tags') or [])})" if r0.get("tags") else ""
        dims = ", ".join(f"{k}={v}" for k, v in (r0.get("dims") or {}).items())
        lines.append(f"#### {op} `{shape}`{tags}\n\n{dims}, {r0.get('dtype')}, {r0.get('device')}\n")
        body = []
        for impl in impls:
            _, best_t = ix.best(op, shape, "fwd_bwd", PEER_KINDS, like=impl)
            _, best_m = ix.best(op, shape, "fwd_bwd", PEER_KINDS, what="peak_mem_bytes", like=impl)
            eager = ix.eager_of(op, shape, impl)
            te, me = ix.time(op, shape, eager, "fwd_bwd"), ix.mem(op, shape, eager, "fwd_bwd")
            rf = ix.get(op, shape, impl, "fwd_bwd") or {}
            t, m = rf.get("median"), rf.get("peak_mem_bytes")
            cells = [f"**{impl}**" if impl.startswith("ours_") else impl,
                     fmt_time(t), fmt_ratio(_ratio(t, best_t)), fmt_ratio(_ratio(t, te)),
                     fmt_bytes(m), fmt_ratio(_ratio(m, best_m)), fmt_ratio(_ratio(m, me))]
            for mode in ("fwd", "bwd"):
                r = ix.get(op, shape, impl, mode) or {}
                t_mode = r.get("median")
                cells += [fmt_time(t_mode), fmt_ratio(_ratio(t_mode, ix.time(op, shape, eager, mode))),
                          fmt_bytes(r.get("peak_mem_bytes"))]
            any_row = rf or ix.get(op, shape, impl, "fwd") or ix.get(op, shape, impl, "bwd") or {}
            check = any_row.get("check", "-")
            extra = [f"{k}={any_row[k]}" for k in ("backend", "cce_impl", "path") if k in any_row and
                     not (k == "backend" and impl.startswith("ours_") and impl.split("_")[1] == any_row[k])]
            if "mem_error" in any_row:
                extra.append(any_row["mem_error"])
            loads = [r.get("loadavg_1m") for r in (ix.get(op, shape, impl, m) for m in MODES) if r]
            loads = [x for x in loads if x is not None]
            if loads and max(loads) > busy_load:
                extra.append(f"busy machine: load {max(loads):.1f}")
            rounds = any_row.get("rounds")
            cells += [check if "MISMATCH" not in str(check) else f"**{check}**",
                      "; ".join(extra + ([f"{rounds} rounds"] if rounds else []))]
            body.append(cells)
        header = ["impl", "fwd+bwd", "x best peer", "x eager", "peak mem", "mem x best peer", "mem x eager",
                  "fwd", "fwd x eager", "fwd mem", "bwd", "bwd x eager", "bwd mem", "check", "notes"]
        lines.append(table(header, body) + "\n")
        if op == "batch_layout":
            lines.append(layout_table(ix, op, shape) + "\n")
        if op == "token_logprobs":
            bw = bandwidth_rows(ix, op, shape)
            if bw:
                lines.append("Bandwidth (fwd+bwd must read the logits twice and write the gradient once):\n")
                lines.append(table(["impl", "fwd+bwd", "effective GB/s", "of copy bandwidth"],
                                   [[i, fmt_time(t), f"{g:.1f}", f"{f * 100:.0f}%"] for i, t, g, f in bw]) + "\n")
    return lines


def layout_table(ix: Index, op: str, shape: str) -> str:
    """Real tokens/s of each batch layout (the same real tokens in every layout) and what its rows cost."""
    tp = ix.time(op, shape, "padded", "fwd_bwd")
    body = []
    for impl in ix.impls[(op, shape)]:
        r = ix.get(op, shape, impl, "fwd_bwd") or {}
        t, real = r.get("median"), r.get("real_tokens")
        body.append([impl, real, r.get("positions"), f"{r.get('rows')} x {r.get('row_length')}",
                     f"{r.get('padding_share', float('nan')) * 100:.0f}%", fmt_time(t),
                     f"{real / t:.0f}" if t and real else "-", fmt_ratio(_ratio(tp, t)),
                     fmt_bytes(r.get("peak_mem_bytes"))])
    return table(["layout", "real tokens", "positions run", "rows x length", "padding", "fwd+bwd", "real tokens/s",
                  "x padded", "peak mem"], body)


def csv_rows(ix: Index) -> list:
    out = []
    for (op, shape, impl, mode), r in ix.by.items():
        best_t = ix.best(op, shape, mode, PEER_KINDS, like=impl)[1]
        best_m = ix.best(op, shape, mode, PEER_KINDS, what="peak_mem_bytes", like=impl)[1]
        eager = ix.eager_of(op, shape, impl)
        out.append({"op": op, "shape": shape, "dtype": r.get("dtype"), "device": r.get("device"), "impl": impl,
                    "kind": r.get("kind"), "mode": mode, "median_s": r["median"], "min_s": r["min"],
                    "rounds": r["rounds"], "peak_mem_bytes": r.get("peak_mem_bytes"),
                    "time_x_best_peer": _ratio(r["median"], best_t),
                    "time_x_eager": _ratio(r["median"], ix.time(op, shape, eager, mode)),
                    "mem_x_best_peer": _ratio(r.get("peak_mem_bytes"), best_m),
                    "mem_x_eager": _ratio(r.get("peak_mem_bytes"), ix.mem(op, shape, eager, mode)),
                    "check": r.get("check")})
    return out


# ---------------------------------------------------------------------------------------------- plots
def plots(ix: Index, outdir: str) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(no plots: matplotlib is not installed; `pip install matplotlib` and rerun report.py)"]
    made = []
    for op in ("linear_token_logprobs", "token_logprobs"):
        shapes = ix.shapes.get(op)
        if not shapes:
            continue
        dims = {s: r["dims"] for s, r in shapes.items()}
        axes_spec = []
        for var, fixed in (("N", "V"), ("V", "N")):
            # the value of the other dimension with the most points along this one (ties: the largest)
            counts = defaultdict(set)
            for d in dims.values():
                if var in d and fixed in d:
                    counts[d[fixed]].add(d[var])
            if not counts:
                continue
            fixed_val = max(counts, key=lambda k: (len(counts[k]), k))
            if len(counts[fixed_val]) >= 2:
                axes_spec.append((var, fixed, fixed_val))
        if not axes_spec:
            continue
        fig, axes = plt.subplots(2, len(axes_spec), figsize=(6 * len(axes_spec), 8), squeeze=False)
        impls = []
        for s in shapes:
            impls += [i for i in ix.impls[(op, s)] if i not in impls and i != "copy"]
        for col, (var, fixed, fixed_val) in enumerate(axes_spec):
            for impl in impls:
                pts = sorted((d[var], s) for s, d in dims.items() if d.get(fixed) == fixed_val)
                xs, ts, ms = [], [], []
                for x, s in pts:
                    r = ix.get(op, s, impl, "fwd_bwd")
                    if r:
                        xs.append(x)
                        ts.append(r["median"])
                        ms.append((r.get("peak_mem_bytes") or float("nan")) / 2**20)
                if not xs:
                    continue
                style = "-" if impl.startswith("ours_") else "--"
                axes[0][col].plot(xs, ts, style, marker="o", label=impl)
                tiny = all(not (m >= 1.0) for m in ms)  # < 1 MiB (or unmeasured): invisible on a log axis
                axes[1][col].plot(xs, [m if m >= 1.0 else float("nan") for m in ms], style, marker="o",
                                  label=impl + (" (< 1 MiB, not shown)" if tiny else ""))
            for row, ylabel in ((0, "fwd+bwd median time (s)"), (1, "fwd+bwd peak extra memory (MiB)")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ticks = sorted({d[var] for d in dims.values() if d.get(fixed) == fixed_val})
                ax.set_xticks(ticks)
                ax.set_xticklabels([str(t) for t in ticks])
                ax.set_xlabel(f"{var} ({fixed} = {fixed_val})")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            axes[0][col].legend(fontsize=8)
            axes[1][col].legend(fontsize=8)
        r0 = next(iter(shapes.values()))
        fig.suptitle(f"{op} ({r0.get('dtype')}, {r0.get('device')})")
        fig.tight_layout()
        path = os.path.join(outdir, f"{op}_scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# ---------------------------------------------------------------------------------------------- report
def machine_section(machines: list, settings: list, meta: list) -> str:
    m = (machines[0] if machines else {}).get("lpc_bench", {})
    pm = machines[0] if machines else {}
    commit = meta[0]["commit"] if meta else {}
    rows = [
        ("device", m.get("device")),
        ("GPU", f"{m.get('gpu')} (x{m.get('gpu_count')}, sm_{str(m.get('gpu_capability', '')).replace('.', '')}, "
                f"{m.get('gpu_total_memory_gib')} GiB), driver {m.get('driver', '?')}" if m.get("gpu") else "none"),
        ("CPU", f"{m.get('cpu_model') or pm.get('cpu', {}).get('brand_raw')} x{m.get('cpu_count')} "
                f"(torch threads {m.get('torch_threads')})"),
        ("python", m.get("python") or pm.get("python_version")),
        ("torch", f"{m.get('torch')} (CUDA {m.get('torch_cuda')})"),
        ("triton", m.get("triton")),
        ("transformers", m.get("transformers")),
        ("liger-kernel", m.get("liger_kernel")),
        ("cut-cross-entropy", m.get("cut_cross_entropy")),
        ("lpc-kernels", f"{m.get('lpc_kernels')}; extension {m.get('lpc_extension')}; backends "
                        f"{m.get('lpc_available_backends')}; auto -> {m.get('lpc_auto_backend')}"),
        ("commit", f"{commit.get('id', '?')[:12]}{' (dirty tree)' if commit.get('dirty') else ''}"),
        ("run", ", ".join(f"{x['file']} {x['datetime']}" for x in meta)),
        ("load average", f"start {m.get('loadavg_start')}, end {m.get('loadavg_end')}"),
        ("settings", ", ".join(f"{k}={v}" for k, v in (settings[0] if settings else {}).items())),
    ]
    if m.get("env"):
        rows.append(("environment", ", ".join(f"{k}={v}" for k, v in m["env"].items())))
    return table(["", ""], [[k, v] for k, v in rows])


METHOD = """\
- Time: median over the listed rounds of `benchmark.pedantic` (one call per round, after a warm-up call
  that also compiles / autotunes). A shape's round count is lowered (to no fewer than 2) where its
  rounds would take more than a few seconds. `fwd` is a training forward (graph kept), `bwd` the backward
  alone (its forward runs untimed in the round's setup), `fwd+bwd` both. GPU rounds end with
  `torch.cuda.synchronize()`. On CPU, rows timed while the 1-minute load average exceeded the core count
  + 1 (other processes competing for the cores) are marked "busy machine".
- Peak memory: the peak *extra* memory of the timed call above what was allocated when it started (inputs,
  weights and, for `bwd`, the saved forward graph are not counted; gradients are). GPU:
  `torch.cuda.max_memory_allocated()` growth. CPU: peak RSS growth (`VmHWM` after a `clear_refs` reset) in
  a fresh process per (implementation, shape), glibc mmap threshold pinned to 64 KiB.
- x best peer: ratio to the fastest (or least memory) of eager / torch.compile / Liger-Kernel / CCE on the
  same shape and mode (train_step: of the same family, LPC or plain DPO); x eager: ratio to eager PyTorch
  (train_step: `eager_lpc` / `eager_dpo`). Below 1 is better.
- check: the first forward and backward are compared with the oracle (eager, or `ours_reference` for the
  Gumbel op whose noise differs from torch's) on the same inputs: `ok` = max relative error of the output
  and each gradient within 1e-3 (fp32) / 2e-2 (bf16); `finite` = only checked for NaN/inf (different
  random noise); a MISMATCH row is still timed but should not be trusted.
- Liger's chunked preference losses compute gradients inside their forward call: compare their fwd+bwd.
- CCE runs with its defaults (`filter_eps="high"` gradient filtering on GPU).
"""


def build_report(paths: list, out: str, plots_dir: str, csv_path: str) -> str:
    rows, skipped, machines, settings, meta = load(paths)
    ix = Index(rows)
    device = (machines[0].get("lpc_bench", {}) if machines else {}).get("device") or \
        (rows[0]["device"] if rows else "?")
    parts = [f"# lpc-kernels benchmarks ({device})\n", machine_section(machines, settings, meta), ""]
    tg = targets(ix, device)
    if tg:
        parts += ["## Targets\n", table(["target", "measured", "status"], [list(t) for t in tg]), ""]
    pngs = plots(ix, plots_dir) if rows else []
    cores = (machines[0].get("lpc_bench", {}) if machines else {}).get("cpu_count") or 0
    busy = cores + 1 if cores and device == "cpu" else float("inf")  # our own threads count in the load
    for op in ix.ops():
        parts.append(f"## {op}\n")
        parts += op_tables(ix, op, busy)
    if pngs:
        parts.append("## Plots\n")
        for p in pngs:
            if p.endswith(".png"):
                parts.append(f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(os.path.abspath(out)))})")
            else:
                parts.append(p)
        parts.append("")
    if skipped:
        agg = OrderedDict()
        for s in skipped:
            key = (s.get("op", "?"), s.get("impl", "?"), s["reason"])
            agg.setdefault(key, set()).add(s.get("shape", "?"))
        parts += ["## Skipped\n", table(["op", "impl", "shapes", "reason"],
                                        [[op, impl, len(sh), reason] for (op, impl, reason), sh in agg.items()]), ""]
    parts += ["## Method\n", METHOD]
    text = "\n".join(parts)
    with open(out, "w") as f:
        f.write(text)
    if csv_path:
        crow = csv_rows(ix)
        with open(csv_path, "w", newline="") as f:
            if crow:
                w = csv.DictWriter(f, fieldnames=list(crow[0]))
                w.writeheader()
                w.writerows(crow)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (or directories holding them)")
    p.add_argument("--out", help="markdown output (default: report.md beside the first JSON)")
    p.add_argument("--plots", help="directory for PNG plots (default: beside the markdown)")
    p.add_argument("--csv", help="CSV of every row (default: summary.csv beside the markdown; '' to skip)")
    args = p.parse_args(argv)
    paths = []
    for j in args.json:
        if os.path.isdir(j):
            paths += sorted(os.path.join(j, f) for f in os.listdir(j) if f.endswith(".json"))
        else:
            paths.append(j)
    paths = [x for x in paths if os.path.exists(x) and os.path.getsize(x) > 0]
    if not paths:
        print("report.py: no benchmark JSON found", file=sys.stderr)
        return 1
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(paths[0])), "report.md")
    outdir = os.path.dirname(os.path.abspath(out))
    os.makedirs(outdir, exist_ok=True)
    plots_dir = args.plots or outdir
    os.makedirs(plots_dir, exist_ok=True)
    csv_path = os.path.join(outdir, "summary.csv") if args.csv is None else args.csv
    build_report(paths, out, plots_dir, csv_path)
    print(f"report.py: wrote {out}" + (f", {csv_path}" if csv_path else "") + f" (plots in {plots_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
