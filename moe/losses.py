"""Router auxiliary losses, returned to the caller (never stored in module state).

Shape legend: T tokens (routed, padding excluded), E experts, K top-k.

- load balance (GShard / Switch): E * sum_e f_e * P_e, where f_e is the fraction of tokens whose
  top-1 choice is e (before capacity drops) and P_e the mean router probability of e. It is 1.0
  for a perfectly uniform router and grows to E when one expert takes everything.
- z-loss (ST-MoE): mean_t logsumexp(logits_t)^2; keeps router logits small.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RouterLosses:
    """Unweighted auxiliary losses of one routing decision (fp32 scalars)."""

    load_balance: Tensor
    z_loss: Tensor


def load_balance_loss(probs_TE: Tensor, top1_ids_T: Tensor) -> Tensor:
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.new_zeros(())
    frac_E = torch.bincount(top1_ids_T, minlength=num_experts).to(probs_TE.dtype) / num_tokens
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * (frac_E * mean_prob_E).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def router_losses(logits_TE: Tensor, top1_ids_T: Tensor) -> RouterLosses:
    logits_TE = logits_TE.float()
    probs_TE = torch.softmax(logits_TE, dim=-1)
    return RouterLosses(load_balance_loss(probs_TE, top1_ids_T), router_z_loss(logits_TE))


def weighted_aux_loss(decisions: Iterable, load_balance_weight: float, z_loss_weight: float) -> Tensor | None:
    """sum over decisions of w_lb * load_balance + w_z * z_loss (None when there is nothing).

    Pass each routing decision once (a sibling sublayer reusing a decision adds nothing).
    """
    total: Tensor | None = None
    for decision in decisions:
        losses = getattr(decision, "losses", None)
        if losses is None:
            continue
        term = load_balance_weight * losses.load_balance + z_loss_weight * losses.z_loss
        total = term if total is None else total + term
    return total
