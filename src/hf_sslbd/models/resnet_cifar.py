"""A ResNet whose stem is configurable: the small-image (CIFAR) stem is a 3x3 convolution, stride 1
(or 2), without max-pool, which the stock ``transformers`` ResNet (7x7, stride 2, max-pool) cannot
express.

Everything but the stem is the stock ``ResNetModel``, so weights keep the stock names. This file
imports only ``torch`` and ``transformers``: ``save_pretrained`` copies it beside the weights
(``auto_map``), and ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` then loads the
model in a process that has never installed hf_sslbd.
"""

from torch import Tensor, nn
from transformers import ResNetConfig, ResNetModel
from transformers.models.resnet.modeling_resnet import ResNetConvLayer


class ResNetCifarConfig(ResNetConfig):
    """``ResNetConfig`` plus the stem's kernel size, stride and whether it max-pools."""

    model_type = "resnet_cifar"

    def __init__(
        self, stem_kernel_size: int = 3, stem_stride: int = 1, stem_max_pool: bool = False, **kwargs
    ) -> None:
        self.stem_kernel_size = stem_kernel_size
        self.stem_stride = stem_stride
        self.stem_max_pool = stem_max_pool
        super().__init__(**kwargs)


class ResNetCifarEmbeddings(nn.Module):
    def __init__(self, config: ResNetCifarConfig) -> None:
        super().__init__()
        self.embedder = ResNetConvLayer(
            config.num_channels,
            config.embedding_size,
            kernel_size=config.stem_kernel_size,
            stride=config.stem_stride,
            activation=config.hidden_act,
        )
        self.pooler = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if config.stem_max_pool else nn.Identity()
        )
        self.num_channels = config.num_channels

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"expected {self.num_channels} input channels, got {pixel_values.shape[1]} "
                f"(pixel_values of shape {tuple(pixel_values.shape)})"
            )
        return self.pooler(self.embedder(pixel_values))


class ResNetCifarModel(ResNetModel):
    config_class = ResNetCifarConfig

    def __init__(self, config: ResNetCifarConfig) -> None:
        super().__init__(config)
        self.embedder = ResNetCifarEmbeddings(config)
        self.post_init()


ResNetCifarConfig.register_for_auto_class()
ResNetCifarModel.register_for_auto_class("AutoModel")
