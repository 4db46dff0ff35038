"""finetune/preference_loss.py and the model's per-sequence log-probabilities: DPO against the paper's formula computed
by hand, SimPO and the log-probabilities against TRL's own functions on the same inputs."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.data.preference import PreferenceCollator, encode_pair
from finetune.preference_loss import dpo_loss, simpo_loss

CHOSEN = torch.tensor([-12.0, -30.5, -7.25])
REJECTED = torch.tensor([-14.0, -29.0, -9.0])
REF_CHOSEN = torch.tensor([-13.0, -30.0, -8.0])
REF_REJECTED = torch.tensor([-13.5, -30.0, -8.5])


def test_dpo_loss_is_the_papers_sigmoid_loss():
    beta = 0.1
    result = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    for index in range(3):
        chosen_ratio = CHOSEN[index].item() - REF_CHOSEN[index].item()
        rejected_ratio = REJECTED[index].item() - REF_REJECTED[index].item()
        expected = -math.log(1 / (1 + math.exp(-beta * (chosen_ratio - rejected_ratio))))
        assert result.losses[index].item() == pytest.approx(expected, rel=1e-6)
        assert result.chosen_rewards[index].item() == pytest.approx(beta * chosen_ratio, rel=1e-6)
        assert result.rejected_rewards[index].item() == pytest.approx(beta * rejected_ratio, rel=1e-6)
    metrics = result.metrics()
    assert metrics["rewards/accuracies"] == pytest.approx(2 / 3)  # pair 1: chosen ratio -0.5 < rejected ratio 1.0
    assert metrics["rewards/margins"] == pytest.approx((0.15 - 0.15 + 0.125) / 3, rel=1e-5)  # beta x (1.5, -1.5, 1.25)
    # Equal policy and reference: every reward is 0 and the loss log 2.
    assert dpo_loss(CHOSEN, REJECTED, CHOSEN, REJECTED, beta).losses.tolist() == pytest.approx([math.log(2)] * 3)


def test_simpo_loss_equals_trls_cpo_simpo_loss():
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    beta, gamma = 2.0, 0.5
    trainer_settings = SimpleNamespace(
        alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo",
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    averages_chosen, averages_rejected = CHOSEN / 10, REJECTED / 10
    trl_losses, trl_chosen, trl_rejected = trl_cpo.CPOTrainer.cpo_loss(
        trainer_settings, averages_chosen, averages_rejected
    )
    ours = simpo_loss(averages_chosen, averages_rejected, beta, gamma)
    torch.testing.assert_close(ours.losses, trl_losses)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected)


def test_model_sequence_log_probs_equal_trls_batch_log_probs_on_the_full_logits(tiny_model_dir, tiny_tokenizer):
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [
        encode_pair({"prompt": "类型#裙", "chosen": "这款红色连衣裙宽松舒适。", "rejected": "Bad."}, tiny_tokenizer),
        encode_pair({"conversations": [{"role": "user", "content": "类型#裤"}], "chosen": "复古的条纹长裤。",
                     "rejected": "The temperature in Beijing is 20 degrees."}, tiny_tokenizer),  # fmt: skip
    ]
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        ours = model(**batch, sequence_log_probs=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected_sums = trl_cpo.CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=False)
    expected_means = trl_cpo.CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    torch.testing.assert_close(ours.log_probs, expected_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.log_probs / ours.label_counts, expected_means, rtol=1e-5, atol=1e-5)
    assert ours.label_counts.tolist() == [(row[1:] != -100).sum().item() for row in batch["labels"]]
