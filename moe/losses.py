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
    # scatter_add, not bincount: the same integer counts, in a tensor whose size does not depend
    # on the data (no host sync, no graph break under torch.compile).
    counts_E = torch.zeros(num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_E.scatter_add_(0, top1_ids_T, torch.ones_like(top1_ids_T, dtype=probs_TE.dtype))
    frac_E = counts_E / num_tokens
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


def masked_router_losses(logits_TE: Tensor, top1_ids_T: Tensor, valid_T: Tensor) -> RouterLosses:
    """`router_losses` over the tokens where `valid_T` is True, with static shapes (the static
    execution path; boolean indexing would read the count on the host). Equal to
    `router_losses(logits_TE[valid_T], top1_ids_T[valid_T])` to float rounding."""
    logits_TE = logits_TE.float()
    num_experts = logits_TE.shape[1]
    w_T = valid_T.to(logits_TE.dtype)
    n = w_T.sum().clamp(min=1.0)  # no real token: every sum below is 0, and so are the losses
    probs_TE = torch.softmax(logits_TE, dim=-1)
    counts_E = torch.zeros(num_experts, dtype=logits_TE.dtype, device=logits_TE.device)
    counts_E.scatter_add_(0, top1_ids_T, w_T)
    mean_prob_E = (probs_TE * w_T[:, None]).sum(0) / n
    load_balance = num_experts * (counts_E / n * mean_prob_E).sum()
    z_loss = (torch.logsumexp(logits_TE, dim=-1).pow(2) * w_T).sum() / n
    return RouterLosses(load_balance, z_loss)


def weighted_aux_loss(decisions: Iterable, load_balance_weight: float, z_loss_weight: float) -> Tensor | None:
    """sum over decisions of w_lb * load_balance + w_z * z_loss (None when there is nothing).

    Pass each routing decision once (a sibling sublayer reusing a decision adds nothing).
    """
    total: Tensor | None = None
    for decision in decisions:
        losses = decision.losses  # every moe.Decision carries its (possibly absent) losses
        if losses is None:
            continue
        term = load_balance_weight * losses.load_balance + z_loss_weight * losses.z_loss
        total = term if total is None else total + term
    return total
