"""The renderer's ``compile`` setting values, torch-free (like ``vcut.modes``), so that the
job config checks ``model.compile`` without importing torch; ``pipeline.compile`` uses them."""

#: ``off``, ``auto`` (compile where it pays: ``pipeline.compile.compile_pays``) or a
#: ``torch.compile`` mode.
COMPILE_MODES = ("off", "auto", "default", "max-autotune", "reduce-overhead")
