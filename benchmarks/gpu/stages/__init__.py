"""The GPU script's stages, one module each, run in the order of ``benchmarks.gpu.bench.STAGES``;
each has ``run(bench)`` and records into ``bench.result`` (or skips, saying why)."""
