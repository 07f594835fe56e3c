"""SimCLR (Chen et al., 2020): two views, an MLP projector, NT-Xent with in-batch negatives
gathered across ranks with gradients; optionally i-CutMix (:mod:`hf_sslbd.methods.imix`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from ..backbones import pooled_features
from . import register_method
from .distributed import is_distributed
from .heads import mlp_head
from .imix import check_icutmix, icutmix
from .losses import imix_nt_xent_loss, nt_xent_loss
from .utils import ViewMethod, ViewMethodConfig, check_positive


@dataclass
class SimCLRConfig(ViewMethodConfig):
    """SimCLR. Defaults: the CIFAR-10 recipe measured on this project's CPUs (projector
    feature-512-128, temperature 0.2, ``simclr`` views; SGD lr 0.3, wd 5e-4, batch 256 in the
    training config).

    ImageNet recipe of the SimCLR paper (Chen et al., 2020): projector 2048-2048-128, temperature
    0.1, batch 4096, LARS lr 4.8 (0.3 x batch / 256), wd 1e-6. The backdoor paper's code
    (UMBCvision/SSL-Backdoor) has no SimCLR: it has no ImageNet-100 SimCLR recipe of its own.
    """

    views: str = "simclr"
    hidden_dim: int = 512
    out_dim: int = 128
    num_layers: int = 2
    temperature: float = 0.2
    #: gather negatives from every rank (with gradients) when running on several
    gather_distributed: bool = True
    #: i-CutMix's Beta(alpha, alpha) concentration (i-Mix / PatchSearch: 1.0); None = off
    icutmix_alpha: float | None = None
    #: chance that a batch is i-CutMixed when icutmix_alpha is set
    icutmix_prob: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_positive(self, "hidden_dim", "out_dim", "num_layers", "temperature")
        check_icutmix(self)


@register_method
class SimCLR(ViewMethod):
    name = "simclr"
    config_class = SimCLRConfig
    min_batch_size = 2  # one pair has no negative

    def __init__(
        self, config: SimCLRConfig, backbone: PreTrainedModel, feature_dim: int, image_size: int
    ) -> None:
        super().__init__(config, backbone, feature_dim, image_size)
        if len(self.views.pipelines) != 2:
            raise ValueError(
                f"SimCLR needs a two-view preset, {config.views!r} makes {len(self.views.pipelines)}"
            )
        self.projector = mlp_head(feature_dim, config.hidden_dim, config.out_dim, config.num_layers)

    def forward_views(self, backbone: PreTrainedModel, views: list[Tensor]) -> dict[str, Tensor]:
        gather = self.config.gather_distributed and is_distributed()
        if self.config.icutmix_alpha is not None:
            return self._forward_icutmix(backbone, views, gather)
        # one backbone pass over both views: BN statistics over all 2B images, as SimCLR's global BN
        z = self.projector(pooled_features(backbone, torch.cat(views, dim=0)))
        z_a, z_b = z.chunk(2)
        loss = nt_xent_loss(z_a, z_b, self.config.temperature, gather_distributed=gather)
        return {"loss": loss}

    def _forward_icutmix(
        self, backbone: PreTrainedModel, views: list[Tensor], gather: bool
    ) -> dict[str, Tensor]:
        # the first view is mixed within the local batch, the second stays whole (i-Mix's N-pair)
        mixed = icutmix(views[0], self.config.icutmix_alpha, self.config.icutmix_prob)
        z = self.projector(pooled_features(backbone, torch.cat([mixed.images, views[1]], dim=0)))
        z_a, z_b = z.chunk(2)
        loss = imix_nt_xent_loss(
            z_a, z_b, mixed.permutation, mixed.lam, self.config.temperature, gather_distributed=gather
        )
        return {"loss": loss, "icutmix_lambda": torch.tensor(mixed.lam, device=loss.device)}
