"""``RenderPipeline``: diffusers' SVD pipeline with small hooks, nothing else changed.

``StableVideoDiffusionPipeline.__call__`` and ``_encode_image`` are used as they are, so
``vcut="off"`` stays bit-faithful to stock diffusers and no diffusers code is copied:

- The image encoder carries :class:`EmbeddingCacheHook`, registered in diffusers' own hook
  registry (``diffusers.hooks.HookRegistry``, under :data:`EMBEDDING_CACHE_HOOK`; a
  ``ModelHook`` whose ``new_forward`` replaces the encoder's forward, which torch's forward
  hooks cannot skip). It sees the encoder's input after diffusers' own preprocessing, one
  row per image, and consults the renderer's :class:`~pipeline.cache.EmbeddingCache` row by
  row (key: model namespace + content hash of the row's pixels, :func:`~pipeline.cache.image_key`);
  only the misses run the CLIP encoder, each on its own, so a cached embedding never depends
  on which batch computed it (diffusers' preprocessing is per image, hence the same pixels
  alone or in a batch). It uses no randomness, so the generator stream, and therefore the
  video, is the same on a hit and on a miss. ``last_cache_hits`` holds one flag per image.
  The pipeline gets its own encoder module sharing the weights of the one it is built from
  (:func:`vcut.shared_weight_copy`), so that pipeline, and other renderers built from it,
  stay stock.
- ``prepare_latents`` (the last step before the denoising loop) and ``decode_latents``
  record timestamps, from which the renderer derives the conditioning / denoise / decode
  timings.
- ``decode_latents`` decodes each row (video) of a batch on its own, so that a chunk of
  ``decode_chunk_size`` frames never mixes two videos (SVD's temporal VAE decoder sees the
  frames of a chunk together), and retries with half the ``decode_chunk_size`` (down to 1)
  when the VAE decode raises ``torch.OutOfMemoryError``, instead of failing the video. A
  retried video is valid but not bit-identical to one decoded with the larger chunk.

- ``__call__`` takes ``guidance_start`` and ``guidance_stop`` (fractions of the schedule;
  defaults 0 and 1: diffusers' own call, untouched): classifier-free guidance runs on the
  steps in ``[guidance_start, guidance_stop)`` only, and the UNet runs the conditional half of
  the batch alone on the others (guidance scale 1 there, half the UNet work;
  :mod:`vcut.guidance`). Why hooks and a step callback rather than diffusers' documented
  "dynamic CFG" callback alone (set ``_guidance_scale`` and swap the embeddings from
  ``callback_on_step_end``): SVD's ``__call__`` takes back only ``latents`` from the callback
  and keeps its CFG image latents, embeddings and time ids in locals, so turning CFG off
  mid-loop breaks its batch; copying the loop would fork diffusers. So the loop stays
  diffusers' own: ``callback_on_step_end`` (diffusers' per-step mechanism) counts the steps,
  and :class:`vcut.guidance.CondOnlyHook` on the UNet runs the conditional half on the steps
  outside the interval and hands its prediction back as both halves, so the pipeline's
  guidance step yields the conditional prediction exactly.

Batches: with one CPU generator per row (a list), diffusers draws every random tensor of
``__call__`` (the noise augmentation of the conditioning image, then the initial latents)
with ``randn_tensor``, which draws row ``i`` from generator ``i`` only, in the same order
as for a single video; the scheduler's Euler step draws nothing that is used
(``s_churn=0``). So a row of a batch gets exactly the noise it gets alone.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

from vcut.guidance import check_guidance_interval, guided, install_cond_only_hook, is_stock

from .cache import EmbeddingCache, image_key
from .oom import halve_on_oom

logger = logging.getLogger(__name__)

#: the name of the embedding-cache hook in the image encoder's ``HookRegistry``
EMBEDDING_CACHE_HOOK = "vcut_render.embedding_cache"


class EmbeddingCacheHook(ModelHook):
    """Skips the CLIP image encoder for rows whose pixels it has embedded before.

    Installed on a pipeline's ``image_encoder`` by :class:`RenderPipeline`. Called as
    ``image_encoder(pixel_values)`` (diffusers' call: ``(batch, 3, 224, 224)``, already on
    the device and in the encoder's dtype), it returns the encoder's output with
    ``image_embeds`` assembled row by row from the cache and from one encoder call per miss.
    Any other call, or no cache, runs the encoder unchanged.
    """

    def __init__(self, cache: EmbeddingCache | None = None, namespace: str = "") -> None:
        super().__init__()
        self.cache = cache
        self.namespace = namespace
        self.last_hits: list[bool] = []  # one flag per row of the last call

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if len(args) == 1 and not kwargs:
            x = args[0]  # diffusers' call: image_encoder(pixel_values)
        else:
            x = kwargs["pixel_values"] if not args and set(kwargs) == {"pixel_values"} else None
        if self.cache is None or not isinstance(x, torch.Tensor) or x.ndim != 4:
            self.last_hits = [False] * (len(x) if isinstance(x, torch.Tensor) and x.ndim else 1)
            return forward(*args, **kwargs)
        rows, hits, out = [], [], None
        for i in range(x.shape[0]):
            key = (self.namespace, image_key(x[i : i + 1]))
            embeds = self.cache.get(key)
            hits.append(embeds is not None)
            if embeds is None:
                out = forward(x[i : i + 1])
                embeds = out.image_embeds
                self.cache.put(key, embeds)
            rows.append(embeds.to(x.device))
        self.last_hits = hits
        if len(rows) == 1 and out is not None:
            return out  # one image, encoded now: the encoder's own output
        return CLIPVisionModelOutput(image_embeds=torch.cat(rows))


def _own_copy(image_encoder: nn.Module) -> nn.Module:
    """A weight-sharing copy of ``image_encoder`` (its cache hook, if any, copied without the cache)."""
    from vcut import shared_weight_copy

    registry = getattr(image_encoder, "_diffusers_hook", None)
    hook = registry.get_hook(EMBEDDING_CACHE_HOOK) if isinstance(registry, HookRegistry) else None
    if hook is None:
        return shared_weight_copy(image_encoder)
    cache, hook.cache = hook.cache, None  # a cache holds a lock: never copied (nor shared)
    try:
        return shared_weight_copy(image_encoder)
    finally:
        hook.cache = cache


def install_embedding_cache_hook(image_encoder: nn.Module) -> EmbeddingCacheHook:
    """Register a fresh :class:`EmbeddingCacheHook` on ``image_encoder`` (replacing one that
    is already there: never two) and return it."""
    registry = HookRegistry.check_if_exists_or_initialize(image_encoder)
    if registry.get_hook(EMBEDDING_CACHE_HOOK) is not None:
        registry.remove_hook(EMBEDDING_CACHE_HOOK, recurse=False)
    hook = EmbeddingCacheHook()
    registry.register_hook(hook, EMBEDDING_CACHE_HOOK)
    return hook


class RenderPipeline(StableVideoDiffusionPipeline):
    """A ``StableVideoDiffusionPipeline`` with an embedding cache, timing marks and decode back-off.

    Build it from a loaded pipeline's components: ``RenderPipeline(**stock.components)``.
    Not thread-safe: one renderer per worker.
    """

    def __init__(self, vae, image_encoder, unet, scheduler, feature_extractor) -> None:
        # Its own encoder module (same weights): the hook must not reach the pipeline it came from.
        image_encoder = _own_copy(image_encoder)
        super().__init__(
            vae=vae,
            image_encoder=image_encoder,
            unet=unet,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
        )
        self.embedding_hook = install_embedding_cache_hook(self.image_encoder)
        self.cond_only_hook = install_cond_only_hook(self.unet)  # inert outside a guidance interval
        self._guidance_interval: tuple[float, float] = (0.0, 1.0)
        self._guidance_step = 0
        self.marks: dict[str, float] = {}
        self.last_decode_chunk_size: int | None = None
        self.last_decode_retries: int = 0
        #: called once the conditioning (which casts the VAE to fp32 and back) is done
        self.after_conditioning: Callable[[], None] | None = None

    # -- embedding cache (the image encoder's hook holds it) ---------------------------------
    @property
    def embedding_cache(self) -> EmbeddingCache | None:
        return self.embedding_hook.cache

    @embedding_cache.setter
    def embedding_cache(self, cache: EmbeddingCache | None) -> None:
        self.embedding_hook.cache = cache

    @property
    def cache_namespace(self) -> str:
        """Part of every cache key: the model and dtype (the same pixels embed differently)."""
        return self.embedding_hook.namespace

    @cache_namespace.setter
    def cache_namespace(self, namespace: str) -> None:
        self.embedding_hook.namespace = namespace

    @property
    def last_cache_hits(self) -> list[bool]:
        """One flag per image of the last call: its embedding came from the cache."""
        return self.embedding_hook.last_hits

    @property
    def last_cache_hit(self) -> bool:
        """Every image of the last call was a hit."""
        return bool(self.last_cache_hits) and all(self.last_cache_hits)

    # -- guidance on part of the schedule -------------------------------------------------------
    def __call__(self, *args: Any, guidance_start: float = 0.0, guidance_stop: float = 1.0, **kwargs: Any):
        """diffusers' ``StableVideoDiffusionPipeline.__call__``, with classifier-free guidance on
        the steps in ``[guidance_start, guidance_stop)`` of the schedule only (see the module doc).
        The defaults (0, 1) call diffusers unchanged."""
        start, stop = check_guidance_interval(guidance_start, guidance_stop)
        if is_stock(start, stop):
            return super().__call__(*args, **kwargs)
        user_callback = kwargs.pop("callback_on_step_end", None)

        def next_step(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            self._guidance_step = step + 1
            return user_callback(pipe, step, timestep, callback_kwargs) if user_callback else {}

        call = inspect.signature(StableVideoDiffusionPipeline.__call__).bind_partial(self, *args, **kwargs)
        call.apply_defaults()
        if not float(call.arguments["max_guidance_scale"]) > 1.0:  # no CFG at all: nothing to halve
            return super().__call__(*args, **kwargs, callback_on_step_end=user_callback)
        self._guidance_interval, self._guidance_step = (start, stop), 0
        self.cond_only_hook.decide = self._conditional_only
        try:
            return super().__call__(*args, callback_on_step_end=next_step, **kwargs)
        finally:
            self.cond_only_hook.decide = None
            self.cond_only_hook.clear()
            self._guidance_interval = (0.0, 1.0)

    def _conditional_only(self) -> bool:
        """Asked by the UNet's hook at each UNet call: this step runs the conditional half only."""
        start, stop = self._guidance_interval
        # diffusers sets _num_timesteps before the loop (step 0 is guided iff start == 0 anyway).
        steps = max(1, int(getattr(self, "_num_timesteps", 0) or 1))
        return not guided(self._guidance_step, steps, start, stop)

    # -- timing -----------------------------------------------------------------------------
    def mark(self, name: str) -> None:
        """Record ``time.perf_counter()`` under ``name`` (after syncing this thread's CUDA stream,
        so its GPU work is counted; not the whole device, so that a decode on another stream,
        see ``Renderer.generate_stream``, goes on meanwhile)."""
        if self._execution_device.type == "cuda":
            torch.cuda.current_stream(self._execution_device).synchronize()
        self.marks[name] = time.perf_counter()

    # -- timing marks and decode back-off ------------------------------------------------
    def prepare_latents(self, *args, **kwargs):
        latents = super().prepare_latents(*args, **kwargs)
        self.mark("conditioning_end")
        if self.after_conditioning is not None:  # the renderer's: the VAE is free again
            self.after_conditioning()
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
        def halved(chunk: int, smaller: int) -> None:
            logger.warning(
                "VAE decode ran out of memory with decode_chunk_size=%d; retrying with %d", chunk, smaller
            )
            self.last_decode_retries += 1

        decode = super().decode_latents
        return halve_on_oom(lambda n: decode(latents, num_frames, n), chunk, halved)
