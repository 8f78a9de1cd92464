"""One TRL DPO step: ``trl.DPOTrainer`` against ``LPCDPOTrainer(lpc=False)`` (same model, data, seed), step time and
peak memory, each run in its own process (peak RSS is per process), alternating, ``--repeats`` times.

    python benches/trl_step.py --out benches/results/cpu/trl_step.md

Model: a random Llama (hidden 256, 2 layers, vocabulary 32000) with the tokenizer of ``lpc.tiny_model``; 8 pairs of
~150-token answers per step, fp32 (bf16=False: DPOConfig defaults to bf16 autocast, also on CPU), CPU;
6 steps, the first 2 not timed.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = [{"prompt": f"question {i}: tell me about topic {i}.",
         "chosen": " " + " ".join(f"fact{(i * 7 + j) % 97}" for j in range(60)),
         "rejected": " " + " ".join(f"claim{(i * 5 + j) % 89}" for j in range(50))} for i in range(64)]


def child(impl: str, model_dir: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if impl == "trl":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
        extra = {}
    else:
        from lpc.integrations.trl import LPCDPOConfig as Config, LPCDPOTrainer as Trainer
        extra = {"lpc": False}
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        args = Config(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-4,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, bf16=False,
                      **extra)
        trainer = Trainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS),
                          processing_class=tok, callbacks=[Clock()])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"impl": impl, "step_s": statistics.median(times[2:]), "first_loss": loss[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_train_mib": rss0 / 1024}


def make_model(directory: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lpc.tiny_model import make_tiny_model

    tiny = make_tiny_model(os.path.join(directory, "tok"), [r[k] for r in ROWS for k in r], vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(os.path.join(directory, "model"))
    tok.save_pretrained(os.path.join(directory, "model"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="markdown file for the table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", nargs=2, metavar=("IMPL", "MODEL_DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps)))
        return
    results = {"trl": [], "lpc": []}
    with tempfile.TemporaryDirectory() as d:
        make_model(d)
        for r in range(a.repeats):
            for impl in ("trl", "lpc"):
                out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", impl,
                                      os.path.join(d, "model")], capture_output=True, text=True, check=True)
                results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(results[impl][-1], flush=True)
    lines = ["| trainer | step time (median over repeats; each the median of steps 3..N) | runs | peak RSS (MiB) "
             "| first-step loss |", "|---|---|---|---|---|"]
    for impl, name in (("trl", "trl.DPOTrainer"), ("lpc", "LPCDPOTrainer(lpc=False)")):
        rs = results[impl]
        lines.append(f"| {name} | {statistics.median(x['step_s'] for x in rs) * 1e3:.0f} ms | "
                     f"{', '.join(str(round(x['step_s'] * 1e3)) for x in rs)} ms | "
                     f"{statistics.median(x['peak_rss_mib'] for x in rs):.0f} | {rs[0]['first_loss']:.6f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        env = environment()  # before the file is opened: it would make the tree dirty
        with open(a.out, "w") as f:
            f.write(__doc__.split("\n\n")[0] + "\n\n" + env + "\n\n" + text + "\n")


def environment() -> str:
    """Where it ran: the suite's machine info (device, CPU, torch, Triton, ...), TRL and the commit."""
    import _common
    import trl

    info = _common.machine_info()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    keys = ("device", "cpu_model", "torch_threads", "python", "torch", "triton", "transformers")
    rows = [f"| {k} | {info.get(k)} |" for k in keys] + [f"| trl | {trl.__version__} |",
                                                         f"| commit | {commit}{' (dirty tree)' if dirty else ''} |"]
    return "\n".join(["| | |", "|---|---|"] + rows)


if __name__ == "__main__":
    main()
