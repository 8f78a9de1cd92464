"""``lpc.integrations.trl``: ``LPCDPOTrainer`` against ``trl.DPOTrainer`` (the oracle for ``lpc=False``), LPC training
through TRL, and the saved directory loading back in ``lpc``."""

import json
import math

import pytest
import torch

pytest.importorskip("trl.trainer.utils")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from lpc.integrations.trl import LPCDPOConfig, LPCDPOTrainer, completion_features  # noqa: E402
from lpc.config import LPCConfig  # noqa: E402
from lpc.model import LPCModel  # noqa: E402
from lpc.tiny_model import make_tiny_model  # noqa: E402

ROWS = [{"prompt": f"question {i}: what is {i} plus {i}?", "chosen": f" it is {2 * i}.",
         "rejected": f" maybe {2 * i + 1}, or {i}."} for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [r[k] for r in ROWS for k in ("prompt", "chosen", "rejected")] * 20
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, vocab_size=320, seed=3)


def _args(cls, out, **kw):
    return cls(**{**dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, beta=0.1,
                         bf16=False), **kw})


def _run(cls, config_cls, model_dir, out, resume=None, **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = cls(model=model, ref_model=ref, args=_args(config_cls, out, **kw), train_dataset=Dataset.from_list(ROWS),
                  processing_class=tok)
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_without_latent_matches_trl_dpo(model_dir, tmp_path, loss_type):
    """lpc=False: the same first-step loss and rewards as trl.DPOTrainer on the same model, data and seed."""
    _, want = _run(DPOTrainer, DPOConfig, model_dir, tmp_path / "trl", loss_type=[loss_type])
    _, got = _run(LPCDPOTrainer, LPCDPOConfig, model_dir, tmp_path / "lpc", loss_type=[loss_type], lpc=False)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert got[0][key] == pytest.approx(want[0][key], rel=1e-4, abs=1e-4), key  # fp32 sums of ~20 tokens


def test_lpc_trains_logs_and_saves_for_lpc_evaluate(model_dir, tmp_path):
    trainer, logs = _run(LPCDPOTrainer, LPCDPOConfig, model_dir, tmp_path / "lpc", num_codes=4)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert {"rewards/accuracies", "lpc/kl", "lpc/code_perplexity", "num_tokens"} <= set(logs[0])
    assert trainer.lpc_model.hidden_rms.item() != 1.0  # calibrated on the first batch
    codebook = trainer.lpc_model.codebook.detach().clone()
    assert any(g.get("lpc") for g in trainer.optimizer.param_groups)
    trainer.save_model(str(tmp_path / "final"))
    loaded = LPCModel.from_pretrained(tmp_path / "final")
    assert loaded.lpc.num_codes == 4 and torch.equal(loaded.codebook, codebook)
    assert json.load(open(tmp_path / "final" / "lpc_config.json"))["lpc"]["num_codes"] == 4


def test_resume_continues_like_the_uninterrupted_run(model_dir, tmp_path):
    """Checkpoints hold the heads; resuming from step 1 ends step 2 with the heads and loss of the run that went on
    (the Gumbel noise is a function of the step, not of the process's history)."""
    kw = dict(num_codes=4, save_strategy="steps", save_steps=1)
    full, logs = _run(LPCDPOTrainer, LPCDPOConfig, model_dir, tmp_path / "full", **kw)
    assert (tmp_path / "full" / "checkpoint-1" / "lpc_heads.safetensors").is_file()
    resumed, logs2 = _run(LPCDPOTrainer, LPCDPOConfig, model_dir, tmp_path / "full", resume=str(
        tmp_path / "full" / "checkpoint-1"), **kw)
    assert logs2[-1]["loss"] == pytest.approx(logs[-1]["loss"], rel=1e-6)
    for name, p in full.lpc_model.named_parameters():
        if not name.startswith("policy."):
            torch.testing.assert_close(dict(resumed.lpc_model.named_parameters())[name], p, msg=name)


def test_completion_features_by_hand():
    hidden = torch.arange(2 * 2 * 5, dtype=torch.float32).view(4, 5, 1)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]])
    h_x, h_w, h_l = completion_features(hidden, mask)
    assert h_x.squeeze(1).tolist() == [1.0, 5.0] and h_w.squeeze(1).tolist() == [3.0, 9.0]
    assert h_l.squeeze(1).tolist() == [12.0, 17.0]


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        LPCDPOConfig(output_dir=str(tmp_path), loss_type=["hinge"], report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"LPCDPOConfig: tau: must be a number > 0, got 0.0"):
        LPCDPOConfig(output_dir=str(tmp_path), tau=0.0, report_to="none", use_cpu=True)


def test_lpc_settings_are_those_of_lpc_train(tmp_path):
    """Every LPCConfig setting, with lpc.train's defaults; the KL weight defaults by loss as lpc.train's does."""
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert LPCDPOConfig(**base).lpc_config() == LPCConfig()
    cfg = LPCDPOConfig(**base, num_codes=4, prior_sample="gumbel", head_hidden=8, free_bits=0.5)
    assert cfg.lpc_config() == LPCConfig(num_codes=4, prior_sample="gumbel", head_hidden=8)
    assert cfg.loss_config().free_bits == 0.5
    assert [LPCDPOConfig(**base, loss_type=[t]).lpc_kl_weight for t in ("sigmoid", "ipo")] == [1.0, 10.0]
    assert LPCDPOConfig(**base, lpc=False).lpc_config() is None


def test_first_step_margins_are_zero_under_bf16_autocast(model_dir, tmp_path):
    """DPOConfig's default bf16 autocast: the policy and its reference (the same weights at step 1) are scored
    in the same dtype, so the first-step rewards are fp32 rounding (the fused loss and linear_token_logprobs sum
    in different orders: ~1e-7 relative), not the ~1e-5 relative of bf16 against fp32 head inputs."""
    _, logs = _run(LPCDPOTrainer, LPCDPOConfig, model_dir, tmp_path / "bf16", lpc=False, bf16=True)
    for side in ("chosen", "rejected"):
        assert abs(logs[0][f"rewards/{side}"]) <= 0.1 * 2e-6 * abs(logs[0][f"logps/{side}"]), logs[0]
