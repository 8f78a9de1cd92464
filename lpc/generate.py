"""``python -m lpc.generate --run <dir> --prompt "..."``: answers from a trained LPC policy, ``z`` from the prior as at
test time (the run's ``--inference`` rule) or forced with ``--code k`` (``z = E[k]``; ``--code all``: one answer per
code), added to the final hidden state before the LM head at every generated position, as in training. Greedy by
default, so differences between codes come from ``z`` alone; prompts are formatted as in training."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from transformers import AutoTokenizer

from .cli import HelpFormatter
from .config import ConfigError
from .hf import decoder_of, lm_head_of
from .model import LPCModel
from .runtime import resolve_device


def _cache_keyword(decoder) -> str:
    """The decoder's cache keyword: ``cache`` or ``past_key_values`` (renamed across transformers versions)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _decoder_step(decoder, ids: torch.Tensor, cache, key: str):
    """``(last hidden [B, D], cache)``: one incremental pass, the cache passed as keyword ``key``
    (``_cache_keyword``)."""
    out = decoder(input_ids=ids, use_cache=True, **{key: cache})
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.last_hidden_state[:, -1], new_cache


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of ``prompt`` formatted as the trainer formats prompts."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def generate(model: LPCModel, ids: list[int], *, z: Optional[torch.Tensor] = None, codes: Optional[list[int]] = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """Continue prompt ``ids``; returns ``(new token ids per row, prior probabilities [K] or empty)``.

    Rows: one per entry of ``codes`` (``z = E[code]``), else one row with ``z`` (``None``: from the prior,
    the model's inference rule; ignored without LPC).
    """
    if not ids:
        raise ValueError("the prompt has no tokens")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    decoder = decoder_of(model.policy)
    weight, bias = lm_head_of(model.policy)
    rows = len(codes) if codes else 1
    cache_key = _cache_keyword(decoder)
    x = torch.tensor([ids] * rows, device=device)
    h, cache = _decoder_step(decoder, x, None, cache_key)
    prior = torch.zeros(0)
    if model.lpc is not None:
        prior_logits = model.prior(h[:1].to(model.codebook.dtype))
        prior = torch.softmax(prior_logits.float(), -1)[0].cpu()
        if codes:
            z = model.code_z(torch.tensor(codes, device=device))
        elif z is None:
            z = model.prior_z(prior_logits)[1].expand(rows, -1)
    else:
        z = None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    weight_t = weight.float().T  # the fp32 LM head, cast once for every token
    bias_f = bias.float() if bias is not None else 0.0
    for _ in range(max_new_tokens):
        hz = h.float() + (z.float() if z is not None else 0.0)
        logits = hz @ weight_t + bias_f
        if temperature <= 0:
            nxt = logits.argmax(-1).cpu()
        else:
            probs = torch.softmax(logits.cpu() / temperature, -1)
            if top_p < 1.0:  # nucleus: keep the smallest set of tokens with mass >= top_p
                sp, si = probs.sort(-1, descending=True)
                keep = sp.cumsum(-1) - sp < top_p
                probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
                probs = probs / probs.sum(-1, keepdim=True)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        for r in range(rows):
            if not done[r]:
                out[r].append(int(nxt[r]))
                if eos_token_id is not None and int(nxt[r]) == eos_token_id:
                    done[r] = True
        if bool(done.all()):
            break
        h, cache = _decoder_step(decoder, nxt.to(device)[:, None], cache, cache_key)
    return out, prior


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lpc.generate`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m lpc.generate", formatter_class=HelpFormatter,
                                description="Generate answers from a trained LPC run, with z from the prior or a "
                                            "forced code.")
    p.add_argument("--run", required=True, help="run directory written by python -m lpc.train (uses final/)")
    p.add_argument("--checkpoint", default=None, help="a saved model directory instead of <run>/final")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text; repeat the flag for several prompts")
    p.add_argument("--code", default=None,
                   help="force z = E[k] (an int in [0, K)), or 'all' for one answer per code (default: z from "
                        "the prior)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer instead of text")
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """CLI entry point; returns the answers as dicts (``prompt``, ``code``, ``text``, ``prior``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature: must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p: must be in (0, 1], got {args.top_p}")
    run = Path(args.run)
    model_dir = Path(args.checkpoint) if args.checkpoint else run / "final"
    if not (model_dir / "lpc_config.json").is_file():
        parser.error(f"--run: {model_dir} is not a saved LPC model (no lpc_config.json); train first, or pass "
                     "--checkpoint")
    cfg_file = run / "train_config.json"
    train_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")
    model = LPCModel.from_pretrained(model_dir).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    k = model.lpc.num_codes if model.lpc is not None else 0
    codes = None
    if args.code is not None:
        if model.lpc is None:
            parser.error("--code: this run was trained without LPC (--no-lpc): it has no codes")
        if args.code == "all":
            codes = list(range(k))
        else:
            try:
                c = int(args.code)
            except ValueError:
                parser.error(f"--code: expected an integer in [0, {k}) or 'all', got {args.code!r}")
            if not 0 <= c < k:
                parser.error(f"--code: must be in [0, {k}) (the codebook has K={k} codes), got {c}")
            codes = [c]
    chat = train_cfg.get("model") is not None and bool(getattr(tok, "chat_template", None))
    answers = []
    for prompt in args.prompt:
        ids = prompt_ids(tok, prompt, chat)
        new, prior = generate(model, ids, codes=codes, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, eos_token_id=tok.eos_token_id,
                              seed=args.seed)
        labels = codes if codes else ["prior"]
        if not args.json:
            print(f"prompt: {prompt}")
            if prior.numel():
                top = prior.topk(min(3, prior.numel()))
                print("  prior p(z|x): " + ", ".join(f"code {int(i)} {float(v):.2f}"
                                                     for v, i in zip(top.values, top.indices)))
        for label, toks in zip(labels, new):
            text = tok.decode(toks, skip_special_tokens=True)
            rec = {"prompt": prompt, "code": label, "text": text, "prior": [round(float(p), 4) for p in prior]}
            answers.append(rec)
            if args.json:
                print(json.dumps(rec))
            else:
                name = f"code {label}" if label != "prior" else ("z from the prior" if k else "answer")
                print(f"  [{name}] {text}")
    sys.stdout.flush()
    return answers


if __name__ == "__main__":
    main()
