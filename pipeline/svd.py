"""``RenderPipeline``: diffusers' SVD pipeline with small hooks, nothing else changed.

``StableVideoDiffusionPipeline.__call__`` is used as is, so ``vcut="off"`` stays
bit-faithful to stock diffusers. Only methods that ``__call__`` calls are wrapped:

- ``_encode_image`` consults the renderer's :class:`~pipeline.cache.EmbeddingCache`
  (key: model namespace + content hash of the PIL image) and runs the CLIP image encoder
  only on a miss. It uses no randomness, so the generator stream, and therefore the
  video, is the same on a hit and on a miss. The tail that diffusers applies to the raw
  embedding (repeat per video, zeros for the unconditional half of CFG) is reproduced
  exactly; the raw embedding itself comes from diffusers' own code on a miss. A list of
  images (a batch of rows) is looked up image by image, hits and misses mixed; each miss
  is encoded on its own, so a cached embedding never depends on which batch computed it.
  ``last_cache_hits`` holds one flag per image.
- ``prepare_latents`` (the last step before the denoising loop) and ``decode_latents``
  record timestamps, from which the renderer derives the conditioning / denoise / decode
  timings.
- ``decode_latents`` decodes each row (video) of a batch on its own, so that a chunk of
  ``decode_chunk_size`` frames never mixes two videos (SVD's temporal VAE decoder sees the
  frames of a chunk together), and retries with half the ``decode_chunk_size`` (down to 1)
  when the VAE decode raises ``torch.OutOfMemoryError``, instead of failing the video. A
  retried video is valid but not bit-identical to one decoded with the larger chunk.

Batches: with one CPU generator per row (a list), diffusers draws every random tensor of
``__call__`` (the noise augmentation of the conditioning image, then the initial latents)
with ``randn_tensor``, which draws row ``i`` from generator ``i`` only, in the same order
as for a single video; the scheduler's Euler step draws nothing that is used
(``s_churn=0``). So a row of a batch gets exactly the noise it gets alone.
"""

from __future__ import annotations

import logging
import time

import PIL.Image
import torch
from diffusers import StableVideoDiffusionPipeline

from .cache import EmbeddingCache, image_key

logger = logging.getLogger(__name__)


class RenderPipeline(StableVideoDiffusionPipeline):
    """A ``StableVideoDiffusionPipeline`` with an embedding cache, timing marks and decode back-off.

    Build it from a loaded pipeline's components: ``RenderPipeline(**stock.components)``.
    Not thread-safe: one renderer per worker.
    """

    def __init__(self, vae, image_encoder, unet, scheduler, feature_extractor) -> None:
        super().__init__(
            vae=vae,
            image_encoder=image_encoder,
            unet=unet,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
        )
        self.embedding_cache: EmbeddingCache | None = None
        self.cache_namespace: str = ""
        self.marks: dict[str, float] = {}
        self.last_cache_hit: bool = False  # every image of the last call was a hit
        self.last_cache_hits: list[bool] = []  # one per image of the last call
        self.last_decode_chunk_size: int | None = None
        self.last_decode_retries: int = 0

    # -- timing -----------------------------------------------------------------------------
    def mark(self, name: str) -> None:
        """Record ``time.perf_counter()`` under ``name`` (after a CUDA sync, so GPU work is counted)."""
        if self._execution_device.type == "cuda":
            torch.cuda.synchronize(self._execution_device)
        self.marks[name] = time.perf_counter()

    # -- hooks ------------------------------------------------------------------------------
    def _encode_image(self, image, device, num_videos_per_prompt, do_classifier_free_guidance):
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(img, PIL.Image.Image) for img in images):  # tensors: diffusers' own path
            rows = image.shape[0] if isinstance(image, torch.Tensor) and image.ndim == 4 else len(images)
            self.last_cache_hits = [False] * rows
            self.last_cache_hit = False
            return super()._encode_image(image, device, num_videos_per_prompt, do_classifier_free_guidance)
        cache = self.embedding_cache
        rows, hits = [], []
        for img in images:  # one at a time: a repeated image in the batch is a hit
            key = (self.cache_namespace, image_key(img))
            embedding = cache.get(key) if cache is not None else None
            hits.append(embedding is not None)
            if embedding is None:
                # diffusers' own preprocessing + CLIP encoder; with 1 video and no CFG the tail is identity.
                embedding = super()._encode_image(img, device, 1, False)
                if cache is not None:
                    cache.put(key, embedding)
            rows.append(embedding.to(device))
        self.last_cache_hits = hits
        self.last_cache_hit = all(hits)
        embeddings = torch.cat(rows) if len(rows) > 1 else rows[0]

        # Same tail as diffusers' _encode_image: (batch, 1, dim), zeros in front for CFG.
        bs_embed, seq_len, _ = embeddings.shape
        embeddings = embeddings.repeat(1, num_videos_per_prompt, 1)
        embeddings = embeddings.view(bs_embed * num_videos_per_prompt, seq_len, -1)
        if do_classifier_free_guidance:
            embeddings = torch.cat([torch.zeros_like(embeddings), embeddings])
        return embeddings

    def prepare_latents(self, *args, **kwargs):
        latents = super().prepare_latents(*args, **kwargs)
        self.mark("conditioning_end")
        return latents

    def decode_latents(self, latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 14):
        self.mark("decode_start")
        chunk = max(1, min(decode_chunk_size, num_frames))
        self.last_decode_retries = 0
        videos = []
        for row in range(latents.shape[0]):  # one video at a time: a chunk never spans two videos
            frames, chunk = self._decode_one(latents[row : row + 1], num_frames, chunk)
            videos.append(frames)
        self.last_decode_chunk_size = chunk
        self.mark("decode_end")
        return torch.cat(videos) if len(videos) > 1 else videos[0]

    def _decode_one(self, latents: torch.Tensor, num_frames: int, chunk: int) -> tuple[torch.Tensor, int]:
        while True:
            oom = False
            try:
                frames = super().decode_latents(latents, num_frames, chunk)
            except torch.OutOfMemoryError:
                if chunk <= 1:
                    raise
                oom = True
            if not oom:
                return frames, chunk
            # Outside the except block, so the failed attempt's tensors are already released.
            new_chunk = max(1, chunk // 2)
            logger.warning(
                "VAE decode ran out of memory with decode_chunk_size=%d; retrying with %d", chunk, new_chunk
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            chunk = new_chunk
            self.last_decode_retries += 1
