"""LPC-DPO with TRL: a TRL DPO script with two classes changed (``DPOConfig`` -> ``LPCDPOConfig``, ``DPOTrainer`` ->
``LPCDPOTrainer``). Runs on CPU with a model made by ``python -m lpc.tiny_model``:

    python -m lpc.tiny_model --dataset tests/data/ultrafeedback_sample.jsonl --out /tmp/tiny
    python examples/trl_lpc_dpo.py --model /tmp/tiny --dataset tests/data/ultrafeedback_sample.jsonl --out /tmp/run
    python -m lpc.generate --run /tmp/run --checkpoint /tmp/run --prompt "How do I reverse a list?" --code all

Needs ``pip install 'lpc-kernels[trl]'``.
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from lpc.integrations.trl import LPCDPOConfig, LPCDPOTrainer  # was: from trl import DPOConfig, DPOTrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--dataset", required=True, help="preference data: .jsonl / .parquet or a hub name")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--no-lpc", action="store_true", help="plain DPO on the fused kernels")
    a = p.parse_args()
    local = a.dataset.endswith((".jsonl", ".json", ".parquet"))
    kind = "parquet" if a.dataset.endswith(".parquet") else "json"
    ds = load_dataset(kind, data_files=a.dataset, split="train") if local else load_dataset(a.dataset, split="train")
    # message-list answers (UltraFeedback style) hold the prompt: TRL takes their shared prefix as the prompt
    conversational = isinstance(ds[0]["chosen"], list)
    ds = ds.select_columns(["chosen", "rejected"] if conversational else ["prompt", "chosen", "rejected"])
    model = AutoModelForCausalLM.from_pretrained(a.model)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    args = LPCDPOConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=4, learning_rate=5e-4,
                        beta=0.1, logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=not torch.cuda.is_available(),
                        lpc=not a.no_lpc, num_codes=8, lpc_kl_weight=1.0)  # was: DPOConfig(...) without the LPC fields
    trainer = LPCDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(a.out)
    tokenizer.save_pretrained(a.out)


if __name__ == "__main__":
    main()
