"""``RenderPipeline``: diffusers' SVD pipeline with three small hooks, nothing else changed.

``StableVideoDiffusionPipeline.__call__`` is used as is, so ``vcut="off"`` stays
bit-faithful to stock diffusers. Only three methods that ``__call__`` calls are wrapped:

- ``_encode_image`` consults the renderer's :class:`~pipeline.cache.EmbeddingCache`
  (key: model namespace + content hash of the PIL image) and runs the CLIP image encoder
  only on a miss. It uses no randomness, so the generator stream, and therefore the
  video, is the same on a hit and on a miss. The tail that diffusers applies to the raw
  embedding (repeat per video, zeros for the unconditional half of CFG) is reproduced
  exactly; the raw embedding itself comes from diffusers' own code on a miss.
- ``prepare_latents`` (the last step before the denoising loop) and ``decode_latents``
  record timestamps, from which the renderer derives the conditioning / denoise / decode
  timings.
- ``decode_latents`` retries with half the ``decode_chunk_size`` (down to 1) when the VAE
  decode raises ``torch.OutOfMemoryError``, instead of failing the video. Note that SVD's
  temporal VAE decoder sees ``decode_chunk_size`` frames at a time, so a retried video is
  valid but not bit-identical to one decoded with the larger chunk.
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
        self.last_cache_hit: bool = False
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
        key = None
        embeddings = None
        cache = self.embedding_cache
        if cache is not None and isinstance(image, PIL.Image.Image):
            key = (self.cache_namespace, image_key(image))
            embeddings = cache.get(key)
        self.last_cache_hit = embeddings is not None
        if embeddings is None:
            # diffusers' own preprocessing + CLIP encoder; with 1 video and no CFG the tail is identity.
            embeddings = super()._encode_image(image, device, 1, False)
            if key is not None:
                cache.put(key, embeddings)
        embeddings = embeddings.to(device)

        # Same tail as diffusers' _encode_image.
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
        chunk = max(1, min(decode_chunk_size, latents.shape[0] * latents.shape[1]))
        self.last_decode_retries = 0
        while True:
            oom = False
            try:
                frames = super().decode_latents(latents, num_frames, chunk)
            except torch.OutOfMemoryError:
                if chunk <= 1:
                    raise
                oom = True
            if not oom:
                break
            # Outside the except block, so the failed attempt's tensors are already released.
            new_chunk = max(1, chunk // 2)
            logger.warning(
                "VAE decode ran out of memory with decode_chunk_size=%d; retrying with %d", chunk, new_chunk
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            chunk = new_chunk
            self.last_decode_retries += 1
        self.last_decode_chunk_size = chunk
        self.mark("decode_end")
        return frames
