"""The SSL losses as pure functions of embeddings (no parameters, no state): each method calls
one. Inputs are raw embeddings unless said; the functions L2-normalise where the loss is defined
on the sphere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import all_gather_with_grad, is_distributed, rank


def nt_xent_loss(
    z_a: Tensor, z_b: Tensor, temperature: float = 0.5, gather_distributed: bool = False
) -> Tensor:
    """SimCLR's NT-Xent over a batch of pairs ``(z_a[i], z_b[i])``.

    Each of the 2B embeddings is classified against the 2B - 1 others (its partner is the
    positive); the loss is the mean over all 2B. With ``gather_distributed`` the candidates are
    the embeddings of every rank (gathered *with* gradients), the anchors stay local, and the
    returned loss is this rank's mean: averaging gradients over ranks (DDP) then gives exactly the
    gradient of the loss over the global batch.
    """
    logits_a, logits_b, labels, _ = _nt_xent_logits(z_a, z_b, temperature, gather_distributed)
    loss_a = F.cross_entropy(logits_a, labels)
    loss_b = F.cross_entropy(logits_b, labels)
    return (loss_a + loss_b) / 2


def _nt_xent_logits(
    z_a: Tensor, z_b: Tensor, temperature: float, gather_distributed: bool
) -> tuple[Tensor, Tensor, Tensor, int]:
    """NT-Xent's logits: ``(logits_a, logits_b, labels, offset)``. Row ``i`` of ``logits_a`` is
    anchor ``z_a[i]`` against ``[all z_b | all z_a]`` (itself masked out), ``logits_b`` the other
    way round; ``labels`` index the positives, ``offset`` is this rank's first row."""
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"nt_xent_loss takes two (B, D) tensors of one shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if gather_distributed and not is_distributed():
        raise RuntimeError(
            "nt_xent_loss(gather_distributed=True) needs an initialised torch.distributed process group; "
            "call it with gather_distributed=False on one process"
        )
    z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    batch = z_a.shape[0]
    if gather_distributed:
        all_a, all_b, offset = all_gather_with_grad(z_a), all_gather_with_grad(z_b), rank() * batch
    else:
        all_a, all_b, offset = z_a, z_b, 0
    labels = torch.arange(batch, device=z_a.device) + offset
    # an anchor's own row in its same-view block is not a candidate
    self_mask = F.one_hot(labels, all_a.shape[0]).bool()
    logits_ab = z_a @ all_b.T / temperature
    logits_aa = (z_a @ all_a.T / temperature).masked_fill(self_mask, float("-inf"))
    logits_ba = z_b @ all_a.T / temperature
    logits_bb = (z_b @ all_b.T / temperature).masked_fill(self_mask, float("-inf"))
    return torch.cat([logits_ab, logits_aa], dim=1), torch.cat([logits_ba, logits_bb], dim=1), labels, offset


def _virtual_label_loss(logits: Tensor, labels: Tensor, partner_labels: Tensor, lam: float) -> Tensor:
    """i-Mix's loss on virtual labels: cross-entropy against the soft target ``lam`` on
    ``labels`` and ``1 - lam`` on ``partner_labels`` (= ``lam`` CE + ``(1 - lam)`` CE)."""
    if lam == 1.0:  # unmixed: exactly the plain loss (and no 0 x CE term)
        return F.cross_entropy(logits, labels)
    return lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, partner_labels)


def _check_mixing(permutation: Tensor, lam: float, batch: int) -> None:
    if permutation.shape != (batch,):
        raise ValueError(f"permutation must have shape ({batch},), got {tuple(permutation.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def imix_nt_xent_loss(
    z_a: Tensor,
    z_b: Tensor,
    permutation: Tensor,
    lam: float,
    temperature: float = 0.5,
    gather_distributed: bool = False,
) -> Tensor:
    """NT-Xent with i-Mix virtual labels, for a batch whose view ``a`` was mixed: ``z_a[i]``
    embeds ``lam`` of image ``i`` and ``1 - lam`` of image ``permutation[i]`` (a local index),
    ``z_b`` embeds unmixed views. Same candidates as :func:`nt_xent_loss`.

    Targets: anchor ``a_i`` puts ``lam`` on ``b_i`` and ``1 - lam`` on ``b_permutation[i]``;
    anchor ``b_i`` puts ``lam`` on ``a_i`` and ``1 - lam`` on the view ``a_j`` that carries a
    box of image ``i`` (``permutation[j] = i``), the same weights read the other way. With
    ``lam = 1`` this is :func:`nt_xent_loss`.
    """
    _check_mixing(permutation, lam, z_a.shape[0])
    logits_a, logits_b, labels, offset = _nt_xent_logits(z_a, z_b, temperature, gather_distributed)
    permutation = permutation.to(labels.device)
    loss_a = _virtual_label_loss(logits_a, labels, permutation + offset, lam)
    loss_b = _virtual_label_loss(logits_b, labels, torch.argsort(permutation) + offset, lam)
    return (loss_a + loss_b) / 2


def infonce_queue_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE: each query against its key (positive) and the ``(K, D)`` queue
    (negatives). ``query`` / ``key`` are normalised here; ``queue`` rows must already be unit
    vectors. Keys and queue carry no gradient."""
    query, key = F.normalize(query, dim=1), F.normalize(key.detach(), dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.detach().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


def imix_infonce_loss(
    query: Tensor,
    keys: Tensor,
    queue: Tensor,
    permutation: Tensor,
    lam: float,
    temperature: float = 0.2,
    offset: int = 0,
) -> Tensor:
    """MoCo's InfoNCE with i-Mix virtual labels, for a batch of mixed queries: ``query[i]``
    embeds ``lam`` of image ``i`` and ``1 - lam`` of image ``permutation[i]`` (a local index).

    The partner's key must be a candidate, so (as in i-Mix's MoCo) every query is scored against
    all of the batch's keys and the ``(K, D)`` queue: ``keys`` holds the keys of every rank
    (``(W * B, D)``), this rank's at rows ``offset : offset + B``. Target: ``lam`` on the own key,
    ``1 - lam`` on the partner's. The other keys of the batch are negatives, which the plain
    :func:`infonce_queue_loss` does not have, so ``lam = 1`` gives InfoNCE over
    ``[keys | queue]``, not :func:`infonce_queue_loss`. Keys and queue carry no gradient.
    """
    batch = query.shape[0]
    _check_mixing(permutation, lam, batch)
    if not 0 <= offset <= keys.shape[0] - batch:
        raise ValueError(f"offset {offset} does not place {batch} queries within {keys.shape[0]} keys")
    query, keys = F.normalize(query, dim=1), F.normalize(keys.detach(), dim=1)
    logits = query @ torch.cat([keys, queue.detach()]).T / temperature
    labels = torch.arange(batch, device=query.device) + offset
    return _virtual_label_loss(logits, labels, permutation.to(query.device) + offset, lam)


def negative_cosine_similarity(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean of ``-cos(prediction, stopgrad(target))`` over the batch (in [-1, 1])."""
    return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()


def symmetric_negative_cosine(p_a: Tensor, p_b: Tensor, z_a: Tensor, z_b: Tensor) -> Tensor:
    """BYOL / SimSiam: the prediction of each view regresses the (stop-grad) target of the other,
    averaged over both directions. BYOL's normalised MSE is ``2 + 2 * this``: same optimum,
    gradients twice as large."""
    return (negative_cosine_similarity(p_a, z_b) + negative_cosine_similarity(p_b, z_a)) / 2


def msf_loss(query: Tensor, target: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean shift: the squared distance between the normalised ``query`` and each of the ``k``
    nearest neighbours (among the ``(N, D)`` unit-vector ``bank``) of the normalised ``target``,
    averaged over the neighbours and the batch. Returns ``(loss, neighbour indices (B, k))``.

    MSF enqueues the current targets *before* the search, so each target is its own first
    neighbour; the caller does that."""
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, bank size {bank.shape[0]}], got {k}")
    query, target = F.normalize(query, dim=1), F.normalize(target.detach(), dim=1)
    bank = bank.detach()
    neighbours = (target @ bank.T).topk(k, dim=1).indices  # nearest = largest cosine
    # squared distance of unit vectors: 2 - 2 cos
    distances = 2 - 2 * torch.einsum("bd,bkd->bk", query, bank[neighbours])
    return distances.mean(), neighbours


def rotation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the rotation (or permutation) classifier."""
    return F.cross_entropy(logits, labels)
