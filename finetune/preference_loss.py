"""Preference losses on per-sequence log-probabilities, and the rewards they log (TRL's names and formulas).

  dpo    Rafailov et al. 2023, sigmoid loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi_* and
         ref_* are the summed log-probabilities of the chosen/rejected reply under the trained and the reference
         model; rewards are beta * (pi - ref).
  simpo  Meng et al. 2024, reference-free: -log sigmoid(beta * (avg_c - avg_r) - gamma), where avg_* is the mean
         log-probability per reply token; rewards are beta * avg (as TRL's CPOTrainer logs them).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO = "dpo"
SIMPO = "simpo"
PREFERENCE_LOSSES = (DPO, SIMPO)
REFERENCE_FREE_LOSSES = (SIMPO,)
DEFAULT_SIMPO_GAMMA = 0.5


@dataclass
class PreferenceLoss:
    """Per-pair losses and rewards of one batch."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins, averaged over the pairs."""
        chosen, rejected = self.chosen_rewards.detach().float(), self.rejected_rewards.detach().float()
        return {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
        }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """DPO's sigmoid loss per pair from summed log-probabilities of the trained and the reference model."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float = DEFAULT_SIMPO_GAMMA,
) -> PreferenceLoss:
    """SimPO's reference-free loss per pair from length-averaged log-probabilities, with target margin `gamma`."""
    losses = -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)
    return PreferenceLoss(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def implicit_rewards(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DPO's implicit rewards beta * (log pi - log ref) of the chosen and the rejected replies."""
    return beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps)
