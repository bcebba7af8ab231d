"""DIFD training losses (method.md §4.7): weighted NLL and boundary loss on the query prediction and on the
prototype-alignment prediction of the supports.

- NLL: class weights ``[0.1, 1.0]``, ignore index 255, on ``log(clamp(p, eps, 1 - eps))`` (float32 eps). The
  query term is one weighted mean over all pixels of all episodes and queries (``NLLLoss`` with weights).
- Boundary loss (θ0 = 3, θ = 5): boundaries by 3×3 max-pool of ``1 - x`` minus ``1 - x`` for the one-hot label
  and the probabilities, extended boundaries by 5×5 max-pool; per class ``P = Σ pred_b·gt_ext / (Σ pred_b +
  1e-7)``, ``R = Σ pred_ext·gt_b / (Σ gt_b + 1e-7)``, loss ``mean(1 - 2PR / (P + R + 1e-7))`` over classes and
  images. Pixels labelled 255 get an all-zero one-hot vector and are left out of the sums.
- Alignment: per episode, the weighted NLL and boundary loss of each support slice against its mask,
  averaged over shots; summed over the episodes whose predicted query mask was non-empty
  (``align_valid``) and divided by the number of episodes B, as the official code does (a skipped episode
  counts as zero).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from models.difd import DIFDOutput

CLASS_WEIGHTS = (0.1, 1.0)
IGNORE_INDEX = 255
THETA0 = 3
THETA = 5
BF1_EPS = 1e-7
#: The four terms and their default weights (config key ``loss_weights``).
LOSS_WEIGHTS = {"query_nll": 1.0, "query_boundary": 1.0, "align_nll": 1.0, "align_boundary": 1.0}


def clamped_log(probs: Tensor) -> Tensor:
    """``log(clamp(p, eps, 1 - eps))`` with the float32 machine epsilon."""
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(probs, eps, 1 - eps))


def boundary_loss_per_image(probs: Tensor, labels: Tensor) -> Tensor:
    """Boundary F1 loss of each image, averaged over classes.

    Shape: ``(N, K, H, W)``, ``(N, H, W)`` → ``(N,)``.
    """
    n, k = probs.shape[:2]
    known = labels != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(known, labels, 0), k).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot * known.unsqueeze(1)
    keep = known.unsqueeze(1).to(probs.dtype)

    def boundary(x: Tensor) -> Tensor:
        return F.max_pool2d(1 - x, THETA0, stride=1, padding=(THETA0 - 1) // 2) - (1 - x)

    gt_b = boundary(one_hot)
    pred_b = boundary(probs)
    gt_ext = F.max_pool2d(gt_b, THETA, stride=1, padding=(THETA - 1) // 2)
    pred_ext = F.max_pool2d(pred_b, THETA, stride=1, padding=(THETA - 1) // 2)
    precision = (pred_b * gt_ext * keep).sum((2, 3)) / ((pred_b * keep).sum((2, 3)) + BF1_EPS)
    recall = (pred_ext * gt_b * keep).sum((2, 3)) / ((gt_b * keep).sum((2, 3)) + BF1_EPS)
    bf1 = 2 * precision * recall / (precision + recall + BF1_EPS)
    return (1 - bf1).mean(1)


def check_query_labels(probs: Tensor, qry_labels: Tensor) -> None:
    """``qry_labels (B, Q, H, W)`` must match the query probabilities ``(B, Q, 2, H, W)``: ``ValueError``."""
    if qry_labels.shape != probs.shape[:2] + probs.shape[3:]:
        raise ValueError(
            f"qry_labels: expected shape {tuple(probs.shape[:2] + probs.shape[3:])}, "
            f"got {tuple(qry_labels.shape)}"
        )


class DIFDLoss(nn.Module):
    """Weighted sum of the four DIFD loss terms; a weight of 0 switches a term off (a query term is
    still reported, a switched-off alignment pair is reported as 0 without computing it).

    Shape: ``out.query_probs (B, Q, 2, H, W)``, ``qry_labels (B, Q, H, W)`` int64 in {0, 1, 255},
    ``supp_masks (B, S, H, W)`` → dict of 0-d tensors ``query_nll``, ``query_boundary``, ``align_nll``,
    ``align_boundary``, ``total``.
    """

    def __init__(
        self,
        query_nll: float = 1.0,
        query_boundary: float = 1.0,
        align_nll: float = 1.0,
        align_boundary: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = {
            "query_nll": float(query_nll),
            "query_boundary": float(query_boundary),
            "align_nll": float(align_nll),
            "align_boundary": float(align_boundary),
        }
        for name, value in self.weights.items():
            if value < 0:
                raise ValueError(f"DIFDLoss: weight {name} must be ≥ 0, got {value}")
        self.register_buffer("class_weights", torch.tensor(CLASS_WEIGHTS), persistent=False)

    def forward(self, out: DIFDOutput, qry_labels: Tensor, supp_masks: Tensor) -> dict[str, Tensor]:
        probs = out.query_probs
        check_query_labels(probs, qry_labels)
        b, q, k, h, w = probs.shape
        weight = self.class_weights.to(probs.dtype)
        flat_probs = probs.reshape(b * q, k, h, w)
        flat_labels = qry_labels.reshape(b * q, h, w).long()
        terms = {
            "query_nll": F.nll_loss(
                clamped_log(flat_probs), flat_labels, weight=weight, ignore_index=IGNORE_INDEX
            ),
            "query_boundary": boundary_loss_per_image(flat_probs, flat_labels).mean(),
        }
        zero = probs.new_zeros(())
        wants_align = self.weights["align_nll"] > 0 or self.weights["align_boundary"] > 0
        if out.support_probs is None or not wants_align:
            terms["align_nll"] = zero
            terms["align_boundary"] = zero
        else:
            sp = out.support_probs
            if supp_masks.shape != sp.shape[:2] + sp.shape[3:]:
                raise ValueError(
                    f"supp_masks: expected shape {tuple(sp.shape[:2] + sp.shape[3:])}, "
                    f"got {tuple(supp_masks.shape)}"
                )
            s = sp.shape[1]
            # Support labels: 1 where the mask is 1, 0 where it is 0, 255 elsewhere (official construction).
            labels = torch.full(supp_masks.shape, IGNORE_INDEX, dtype=torch.long, device=supp_masks.device)
            labels = torch.where(supp_masks == 1, 1, torch.where(supp_masks == 0, 0, labels)).reshape(
                b * s, h, w
            )
            log_p = clamped_log(sp.reshape(b * s, k, h, w))
            # Per-image weighted NLL (the official loss is one NLLLoss per support slice).
            pixel = F.nll_loss(log_p, labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="none")
            pixel_w = torch.where(labels == IGNORE_INDEX, 0.0, weight[labels.clamp(max=k - 1)])
            nll = pixel.sum((1, 2)) / pixel_w.sum((1, 2))
            bnd = boundary_loss_per_image(sp.reshape(b * s, k, h, w), labels)
            valid = out.align_valid.to(probs.dtype) if out.align_valid is not None else probs.new_ones(b)
            # Skipped episodes contribute zero; torch.where keeps their values out of the gradient.
            terms["align_nll"] = torch.where(valid.bool(), nll.view(b, s).mean(1), 0.0).sum() / b
            terms["align_boundary"] = torch.where(valid.bool(), bnd.view(b, s).mean(1), 0.0).sum() / b
        terms["total"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms
