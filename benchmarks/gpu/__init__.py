"""Whole SVD-XT videos on one GPU (random weights): seconds per video for each lever, memory, MFU.

Run it through ``benchmarks/gpu.sh`` (which brings diffusers and torchao where the GPU machine
lacks them); directly::

    python -m benchmarks.gpu                      # cuda, SVD-XT at 576x1024, 25 frames, fp16
    python -m benchmarks.gpu --device cpu --tiny  # the same code path, tiny model, CPU

Modules: ``model`` (the random-weight model, images, pipelines), ``peak`` (GPU
peaks), ``machinery`` (time limits, recompile guards, the per-step split), ``bench`` (``Bench``:
budget, timing one configuration, the stage loop), ``summary`` (the Markdown table), ``cli``,
and ``stages/<name>.py``, one per stage.

The model is SVD-XT's architecture built from its published configs with random weights,
on the device, with no download: the UNet (diffusers' default config with 25 frames),
the temporal VAE, the ViT-H/14 CLIP image encoder, the CLIP image processor and the Euler
scheduler. fp16 on CUDA (as the Renderer loads a checkpoint), fp32 on a CPU.

Stages, in this order; the JSON (and a Markdown table beside it) is written, and copied to
``--copy-to``, after every stage, so a run cut short keeps what it measured:

0. ``build``: environment, components.
1. ``stock``: stock diffusers ``StableVideoDiffusionPipeline.__call__`` (no project code).
2. ``eager``: the Renderer (``Renderer.from_pipe``) with VCUT ``off``, ``exact``, ``full``
   and ``full`` + step cache.
3. ``compile``: ``full`` + ``torch.compile`` (``--compile-mode``, default "default"); the
   first video (the compilation) is timed apart, then timed videos with recompiles made
   an error and the number of graphs compiled during them recorded (0 expected).
4. ``compile_step_cache``: ``full`` + compile + step cache ``--step-cache`` (default 3).
5. ``fp8``: ``full`` + compile + step cache + ``quantize="fp8"`` (a UNet of its own: a second
   cold compile); skipped with the renderer's one-line refusal below compute capability 8.9.
6. ``guidance``: the guidance interval ``--guidance-start``/``--guidance-stop`` (default 0,
   0.6) on the fastest renderer built (fp8, else compiled, else eager).
7. ``whole_video``: one whole ``--steps-per-video`` (25) step video of the fastest
   configuration measured, next to its extrapolated figure.
8. ``quality``: PSNR/SSIM of every configuration's frames against stock's (same image and
   seed) at ``--quality-steps`` (6) steps: how far a lever moves the output (random weights).
9. ``batched``: ``--batch-size`` rows (default 4) in one ``generate_batch`` call versus one
   row per call, at 320x512, 14 frames, with the fastest eager Renderer: videos per second.
10. ``macs``: MACs per UNet step of each configuration (``vcut.count_macs``, attention kernels
   counted) and model FLOP utilisation = 2 x MACs / seconds per step / the GPU's dense peak.

How a configuration is timed: one warm-up video, then whole videos (conditioning, denoising,
VAE decode of all frames at once, conversion) at ``S1`` and ``S2`` denoising steps (``--steps``,
default 2,6; a step-cache configuration uses N and 3N, whole cycles of its schedule). Per
step = (t(S2) - t(S1)) / (S2 - S1), fixed = t(S1) - S1 x per step (conditioning + decode),
and a 25-step video = fixed + 25 x per step. The raw seconds are in the JSON. Every video
has its own input image (no embedding-cache hits), and each configuration uses the same
images and seeds, so the frames of the configurations are compared with stock diffusers'.

Budget: ``--budget-s`` (default 430) from the start; a stage starts only if its estimate
fits in what is left after the time kept for the stages after it, and a stage that can
run long (compilation) runs under a hard limit (SIGALRM) that ends it and moves on. Skipped
stages are listed in ``stages_skipped`` with the reason. ``gpu.sh`` kills the process at
``GPU_BENCH_TIMEOUT_S`` (default 470 s).

Weights are RANDOM: these are speed figures, not videos.
"""
