"""The benchmark's model: SVD-XT's architecture with random weights (or the tiny test model), its
input images, the stock and weight-sharing pipelines, and what the project code offers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks import unet_ab

STEPS_PER_VIDEO = 25

#: The VAE of the published SVD / SVD-XT checkpoints (vae/config.json).
SVD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

#: The image encoder of the published SVD / SVD-XT checkpoints (image_encoder/config.json):
#: OpenCLIP ViT-H/14's vision tower as transformers' ``CLIPVisionModelWithProjection``.
SVD_IMAGE_ENCODER_CONFIG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

#: The feature extractor of the published checkpoints (feature_extractor/preprocessor_config.json).
#: SVD's pipeline resizes the image itself and asks this only to normalise.
SVD_FEATURE_EXTRACTOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    height: int
    width: int
    num_frames: int

    def label(self) -> str:
        return f"{self.width}x{self.height}, {self.num_frames} frames"


SHAPES = {
    "full": Shape(576, 1024, 25),  # SVD-XT as published
    "batched": Shape(320, 512, 14),
    "tiny": Shape(64, 64, 4),  # the tiny test model (its VAE halves the image)
    "tiny-batched": Shape(32, 32, 4),
}


@functools.lru_cache(maxsize=64)
def make_image(shape: Shape, index: int):
    """A deterministic input image per index (smooth gradients plus noise, like a photo's statistics)."""
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    y = np.linspace(0, 1, shape.height)[:, None, None]
    x = np.linspace(0, 1, shape.width)[None, :, None]
    base = 0.5 + 0.4 * np.sin(6 * x + 4 * y + rng.uniform(0, 6, size=(1, 1, 3)))
    img = np.clip(base + 0.1 * rng.standard_normal((shape.height, shape.width, 3)), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


# -- the model -------------------------------------------------------------------------------


def _configs(tiny: bool) -> dict[str, Any]:
    """Configs of the five components: SVD-XT's published ones, or the tiny test model's."""
    from vcut import load_unet_config

    if not tiny:
        return {
            "unet": {k: v for k, v in load_unet_config("svd-xt").items() if not k.startswith("_")},
            "vae": dict(SVD_VAE_CONFIG),
            "image_encoder": dict(SVD_IMAGE_ENCODER_CONFIG),
            "feature_extractor": dict(SVD_FEATURE_EXTRACTOR_CONFIG),
        }
    from vcut.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline()  # small: only read for its configs, the same path builds both
    enc = pipe.image_encoder.config
    return {
        "unet": {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")},
        "vae": {k: v for k, v in dict(pipe.vae.config).items() if not k.startswith("_")},
        "image_encoder": {k: getattr(enc, k) for k in SVD_IMAGE_ENCODER_CONFIG},
        "feature_extractor": dict(SVD_FEATURE_EXTRACTOR_CONFIG),
    }


def build_components(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The five pipeline components with random weights, initialised on ``device`` (fast on a GPU)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from vcut.tiny import svd_scheduler

    unet_ab._quiet_diffusers()
    cfg = _configs(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKLTemporalDecoder.from_config(cfg["vae"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    # A few legacy-constructed parameters ignore the default device, hence the .to() after.
    models = {"unet": unet, "vae": vae, "image_encoder": image_encoder}
    for m in models.values():
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return {
        **models,
        "scheduler": svd_scheduler(),
        "feature_extractor": CLIPImageProcessor(**cfg["feature_extractor"]),
    }


def stock_pipeline(components: dict[str, Any]):
    """Stock diffusers' pipeline on the components (its own scheduler object)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline

    comps = dict(components, scheduler=EulerDiscreteScheduler.from_config(components["scheduler"].config))
    pipe = StableVideoDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_sharing_pipeline(components: dict[str, Any]):
    """A stock pipeline whose UNet and VAE are structure-only copies sharing every weight.

    ``apply_vcut`` (and a compile or step cache) change a UNet in place and cannot be undone,
    so every Renderer gets its own copies (as ``unet_ab.make_variants``); the weights exist once.
    """
    comps = dict(components)
    comps["unet"] = unet_ab.shared_weight_copy(components["unet"])
    comps["vae"] = unet_ab.shared_weight_copy(components["vae"])
    return stock_pipeline(comps)
