"""How the outputs of several reward functions make one reward per completion."""

from __future__ import annotations

from typing import Sequence

import torch


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Weighted sum over functions of ``per_func`` ``[n, F]`` (NaN where a function returned None),
    as TRL combines them: a function's None leaves only its own term out (``nansum``), and a
    completion is unscored (NaN: out of the loss and the group statistics) only when every
    function returned None for it. Pure; keeps ``per_func``'s dtype."""
    w = torch.as_tensor(weights, dtype=per_func.dtype)
    total = (per_func * w.unsqueeze(0)).nansum(1)
    total[torch.isnan(per_func).all(1)] = float("nan")
    return total
