"""A tiny, random-weight Stable Video Diffusion pipeline for tests and demos.

Its weights are RANDOM: it renders noise-like videos, not real ones. It exists so that the
real loading path (``StableVideoDiffusionPipeline.from_pretrained`` on a folder written by
``save_pretrained``) and the whole render/encode/job stack can run on a CPU in seconds.
It has the same component types and scheduler settings as the published SVD checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

RANDOM_WEIGHTS_WARNING = (
    "WARNING: the tiny model has RANDOM weights. It is for tests and demos only; "
    "its videos are noise, not real generations."
)

#: Pixel size that the tiny model renders at by default (latents are half of it).
TINY_HEIGHT = 64
TINY_WIDTH = 64
TINY_NUM_FRAMES = 4


def svd_scheduler():
    """The Euler scheduler with the settings of the published SVD / SVD-XT checkpoints."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        trained_betas=None,
        use_karras_sigmas=True,
    )


def make_tiny_pipeline(seed: int = 0):
    """Build the tiny random-weight ``StableVideoDiffusionPipeline`` in memory (fp32, CPU)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=TINY_HEIGHT // 2,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=1,
        cross_attention_dim=32,
        transformer_layers_per_block=1,
        num_attention_heads=(2, 4),
        num_frames=TINY_NUM_FRAMES,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=TINY_HEIGHT,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=224,
            patch_size=32,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=svd_scheduler(),
        feature_extractor=feature_extractor,
    )
    return pipe


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny random-weight pipeline to ``path`` with ``save_pretrained`` (safetensors).

    Load it back with ``StableVideoDiffusionPipeline.from_pretrained(path)``.
    """
    path = Path(path)
    pipe = make_tiny_pipeline(seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "README.md").write_text(
        "# Tiny SVD pipeline (random weights)\n\n" + RANDOM_WEIGHTS_WARNING + "\n\n"
        "Written by `vcut tiny-model`; loadable with "
        "`StableVideoDiffusionPipeline.from_pretrained(this_folder)`.\n"
    )
    return path
