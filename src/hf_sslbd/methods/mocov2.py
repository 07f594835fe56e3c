"""MoCo v2 (Chen et al., 2020): a momentum key encoder, a queue of negative keys, InfoNCE.

Shuffle-BN. Queries and their positive keys must not share BatchNorm statistics, or the model
learns to match batch statistics instead of images. Across ranks the keys are shuffled over the
global batch (gather, one permutation from rank 0, scatter), encoded, and unshuffled, as MoCo
does. On one process there is nothing to shuffle across, so it is emulated: the query batch is
encoded in ``shuffle_bn_splits`` consecutive sub-batches and the key batch, randomly permuted,
in as many sub-batches, so each sub-batch has its own statistics and a key's statistics come
from a random subset of images (the SplitBatchNorm trick of MoCo's CIFAR demo). Backbones
without BatchNorm (ViT) skip the split. Keys are gathered from every rank before they are
enqueued, so every rank holds the same queue.

i-CutMix (``icutmix_alpha``, :mod:`hf_sslbd.methods.imix`; PatchSearch's retraining): the query
view is CutMixed within the local batch before the online encoder, keys stay whole, and the loss
takes i-Mix's virtual labels against the batch's keys and the queue (``imix_infonce_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..backbones import pooled_features
from . import register_method
from .distributed import (
    batch_shuffle_distributed,
    batch_unshuffle_distributed,
    concat_all_gather,
    rank,
    world_size,
)
from .heads import mlp_head
from .imix import check_icutmix, icutmix
from .losses import imix_infonce_loss, infonce_queue_loss
from .utils import (
    MomentumSync,
    ViewMethod,
    ViewMethodConfig,
    check_momentum,
    check_positive,
    enqueue_wrapping,
    momentum_copy,
    update_momentum,
)


@dataclass
class MoCoV2Config(ViewMethodConfig):
    """MoCo v2. Defaults: a CIFAR-10 recipe (queue 4096, key momentum 0.99, temperature 0.2,
    MLP head feature-2048-128 without BN; SGD lr 0.06 x batch / 256, wd 5e-4 in the training
    config).

    The backdoor paper's ImageNet-100 recipe (UMBCvision/SSL-Backdoor ``moco/main_moco.py`` and
    README): ResNet-18, ``--lr 0.06 --batch-size 256`` over 2 GPUs, SGD momentum 0.9, wd 1e-4,
    200 epochs with cosine decay (``--cos``), ``--aug-plus --mlp``, temperature 0.2, queue 65536,
    key momentum 0.999, 128-d output. Its MLP's hidden width is the feature width (512 for
    ResNet-18): set ``hidden_dim=512``, ``queue_size=65536``, ``momentum=0.999`` to match.
    """

    views: str = "mocov2"
    hidden_dim: int = 2048
    out_dim: int = 128
    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2
    #: one-process shuffle-BN emulation: encode queries / shuffled keys in this many sub-batches
    shuffle_bn_splits: int = 2
    #: i-CutMix's Beta(alpha, alpha) concentration (i-Mix / PatchSearch: 1.0); None = off
    icutmix_alpha: float | None = None
    #: chance that a batch is i-CutMixed when icutmix_alpha is set
    icutmix_prob: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_positive(self, "hidden_dim", "out_dim", "queue_size", "temperature", "shuffle_bn_splits")
        check_momentum(self, "momentum")
        check_icutmix(self)


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@register_method
class MoCoV2(ViewMethod, MomentumSync):
    name = "mocov2"
    config_class = MoCoV2Config

    def __init__(
        self, config: MoCoV2Config, backbone: PreTrainedModel, feature_dim: int, image_size: int
    ) -> None:
        super().__init__(config, backbone, feature_dim, image_size)
        self.projector = mlp_head(feature_dim, config.hidden_dim, config.out_dim, batch_norm=False)
        self.key_backbone = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.init_momentum_sync()
        self.split_bn = _has_batch_norm(backbone)

    def check_batch_size(self, global_batch_size: int) -> None:
        super().check_batch_size(global_batch_size)
        if self.config.queue_size % global_batch_size:
            raise ValueError(
                f"mocov2: queue_size {self.config.queue_size} is not divisible by the global batch "
                f"{global_batch_size}; pick a queue size that is a multiple of it"
            )
        if self.split_bn and global_batch_size < 2 * self.config.shuffle_bn_splits:
            raise ValueError(
                f"mocov2: a global batch of {global_batch_size} is too small for "
                f"shuffle_bn_splits={self.config.shuffle_bn_splits} (each sub-batch needs 2 images for BN)"
            )

    def momentum_pairs(self, backbone: PreTrainedModel) -> list[tuple[nn.Module, nn.Module]]:
        return [(backbone, self.key_backbone), (self.projector, self.key_projector)]

    def _splits(self, batch: int) -> int:
        if not self.split_bn or world_size() > 1:
            return 1
        return max(1, min(self.config.shuffle_bn_splits, batch // 2))

    @torch.no_grad()
    def _keys(self, view: Tensor, splits: int) -> Tensor:
        encode = lambda x: self.key_projector(pooled_features(self.key_backbone, x))  # noqa: E731
        if world_size() > 1:
            shuffled, unshuffle = batch_shuffle_distributed(view)
            return batch_unshuffle_distributed(encode(shuffled), unshuffle)
        perm = torch.randperm(view.shape[0], device=view.device)
        keys = torch.cat([encode(chunk) for chunk in view[perm].chunk(splits)])
        return keys[torch.argsort(perm)]

    def enqueue(self, keys: Tensor) -> None:
        """Write the (already gathered) unit-norm keys after the pointer, wrapping around."""
        enqueue_wrapping(self.queue, self.queue_ptr, keys)

    def forward_views(self, backbone: PreTrainedModel, views: list[Tensor]) -> dict[str, Tensor]:
        query_view, key_view = views
        self.sync_momentum_once(backbone)
        mixed = None
        if self.config.icutmix_alpha is not None:
            mixed = icutmix(query_view, self.config.icutmix_alpha, self.config.icutmix_prob)
            query_view = mixed.images
        splits = self._splits(query_view.shape[0])
        features = torch.cat([pooled_features(backbone, chunk) for chunk in query_view.chunk(splits)])
        query = self.projector(features)
        key = F.normalize(self._keys(key_view, splits), dim=1)
        all_keys = concat_all_gather(key)
        out, queue, temperature = {}, self.queue.clone(), self.config.temperature
        if mixed is None:
            loss = infonce_queue_loss(query, key, queue, temperature)
        else:
            # the partner's key is looked up among the keys of every rank (this rank's at offset)
            offset = rank() * key.shape[0]
            loss = imix_infonce_loss(
                query, all_keys, queue, mixed.permutation, mixed.lam, temperature, offset
            )
            out["icutmix_lambda"] = torch.tensor(mixed.lam, device=loss.device)
        self.enqueue(all_keys)
        positive = F.cosine_similarity(query.detach(), key, dim=1).mean()
        return {"loss": loss, "positive_similarity": positive, **out}

    @torch.no_grad()
    def on_optimizer_step(self, backbone: PreTrainedModel, progress: float) -> None:
        for online, target in self.momentum_pairs(backbone):
            update_momentum(online, target, self.config.momentum)
