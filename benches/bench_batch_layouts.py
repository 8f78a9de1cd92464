"""The three batch layouts of ``lpc.data`` (``--batch-layout``) on one LPC-DPO training step.

A step is what ``lpc.train`` does for one micro-batch: collate the pairs in the layout, score them with the
frozen reference (no grad), the policy forward with the latent, the LPC-DPO loss and (``bwd``) the backward
into every trainable parameter; no optimizer step. The implementations are the layouts:

  padded         one row per sequence, right-padded (the layout of every release before this one)
  packed         the sequences packed without padding into rows as long as the longest one
  shared_prompt  one unit [prompt | chosen | rejected] per pair, packed the same way

Lengths are UltraFeedback-like: prompt and answers log-normal with the same median (so the prompt is about a
third of a pair's tokens) and a wide spread, cut to ``max_length`` per sequence. Every layout does the same
work: ``real_tokens`` (prompt + chosen and prompt + rejected, no padding) per step, so real tokens/s is
``real_tokens / time`` and the speed-up over padded is the inverse time ratio. ``positions`` is what the
backbone ran (rows x row length). Every layout is checked against padded (loss and gradients, fp32).
"""

import copy
import sys

import pytest
import torch

import _common as C
from _common import Shape

OP = "batch_layout"
IMPLS = ["padded", "packed", "shared_prompt"]
LAYOUT = {"padded": "padded", "packed": "packed", "shared_prompt": "shared-prompt"}
BETA, KL_WEIGHT, NUM_CODES = 0.1, 1.0, 16


def CHECK_IMPL(impl):  # noqa: N802
    return "padded"


def _s(name, layers, hidden, heads, v, pairs, median, max_length, dtype, rounds, seed=0):
    dims = {"layers": layers, "hidden": hidden, "heads": heads, "V": v, "pairs": pairs, "median_len": median,
            "max_length": max_length, "seed": seed}
    target = seed == 0
    return Shape(f"{name}-P{pairs}-med{median}-max{max_length}-s{seed}", dims, dtype, rounds, quick=target,
                 tags=("target",) if target else ())


SHAPES = C.shapes_for(
    # the tiny model: hidden 256, 4 layers; two more draws of the lengths show the spread
    cpu=[_s("llama-L4-H256-V32000", 4, 256, 4, 32000, 16, 96, 512, "float32", 3, seed) for seed in range(3)],
    gpu=[_s("llama1b-L16-H2048-V128256", 16, 2048, 32, 128256, 8, 192, 1024, "bfloat16", 5)],
)


def sample_pairs(num_pairs: int, median: int, max_length: int, vocab: int, seed: int = 0) -> list:
    """``TokenizedPair``s with log-normal prompt and answer lengths (sigma 0.8: from a few tokens to several
    times the median), each sequence cut to ``max_length`` by ``lpc.data.truncate_pair``."""
    from lpc.data import TokenizedPair, truncate_pair

    g = torch.Generator().manual_seed(seed)

    def length():
        return max(2, int(torch.empty(()).log_normal_(float(torch.tensor(median).log()), 0.8, generator=g)))

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    pairs = []
    for i in range(num_pairs):
        prompt, chosen, rejected = [1] + toks(length()), toks(length()) + [2], toks(length()) + [2]
        prompt, chosen, rejected, _ = truncate_pair(prompt, chosen, rejected, max_length, bos=1)
        pairs.append(TokenizedPair(prompt, chosen, rejected, source=-1, index=i))
    return pairs


def make_inputs(shape: Shape) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lpc.config import LPCConfig
    from lpc.model import LPCModel

    d = shape.dims
    cfg = LlamaConfig(vocab_size=d["V"], hidden_size=d["hidden"], intermediate_size=4 * d["hidden"],
                      num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["heads"],
                      max_position_embeddings=max(2048, d["max_length"]), tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(C.DEVICE):
        policy = LlamaForCausalLM(cfg)
        model = LPCModel(policy, LPCConfig(num_codes=NUM_CODES), backend="auto")
    model.to(shape.torch_dtype).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pairs = sample_pairs(d["pairs"], d["median_len"], d["max_length"], d["V"], seed=d["seed"])
    return {"model": model, "reference": reference, "pairs": pairs}


def step(x: dict, collator) -> torch.Tensor:
    from lpc.data import to_device
    from lpc.losses import LossConfig, preference_objective
    from lpc.objective import reference_logps

    batch = to_device(collator(x["pairs"]), C.DEVICE)
    ref_c, ref_r = reference_logps(x["reference"], batch)
    out = x["model"](batch, mix=0.5, seed=1234, offset=0)
    return preference_objective(out, ref_c, ref_r, LossConfig(loss_type="dpo", beta=BETA, kl_weight=KL_WEIGHT)).loss


def build(impl: str, shape: Shape, x: dict) -> C.Case:
    from lpc.data import PreferenceCollator

    collator = PreferenceCollator(0, LAYOUT[impl])
    batch = collator(x["pairs"])
    rows, length = batch["input_ids"].shape
    info = {"real_tokens": batch["num_tokens"], "positions": rows * length, "rows": rows, "row_length": length,
            "padding_share": round(1 - sum(collator.units(x["pairs"])) / (rows * length), 3)}
    model = x["model"]
    params = [p for p in model.parameters() if p.requires_grad]
    policy = model.policy
    return C.Case(forward=lambda: step(x, collator), backward=C.backward_scalar, params=params,
                  check_params=[policy.lm_head.weight, policy.model.layers[-1].mlp.down_proj.weight,
                                policy.model.embed_tokens.weight], info=info)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES, IMPLS, modes=("fwd_bwd",)))
def test_batch_layout(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode, modes=("fwd_bwd",))
