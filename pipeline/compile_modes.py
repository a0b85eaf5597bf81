"""The renderer's ``compile`` setting: its values and the one parser of them, torch-free (like
``vcut.modes``), so that the job config checks ``model.compile`` without importing torch;
``pipeline.compile`` and ``jobs.config`` both use :func:`compile_mode`."""

from __future__ import annotations

from typing import Any

#: ``off``, ``auto`` (compile where it pays: ``pipeline.compile.compile_pays``) or a
#: ``torch.compile`` mode.
COMPILE_MODES = ("off", "auto", "default", "max-autotune", "reduce-overhead")

#: How YAML and command lines spell a boolean (omegaconf reads ``compile: true`` into a string
#: field as "True"): accepted where ``words`` is set.
_WORDS = {"true": "default", "yes": "default", "on": "default", "false": "off", "no": "off"}


def compile_mode(value: Any, *, label: str = "compile", words: bool = False) -> str:
    """Normalise a ``compile`` setting: ``False``/``None``/``"off"`` -> ``"off"``, ``True`` ->
    ``"default"``, a mode of :data:`COMPILE_MODES` as itself; with ``words``, also the boolean
    words of a config file (``"true"``, ``"False"``, ``yes`` ...).

    Raises ``ValueError`` naming ``label`` and the value for anything else.
    """
    if value is None or isinstance(value, bool):
        return "default" if value else "off"
    if isinstance(value, str):
        text = value.strip() if words else value
        mode = _WORDS.get(text.lower(), text) if words else text
        if mode in COMPILE_MODES:
            return mode
    also = "(or true/false)" if words else "(or True/False)"
    raise ValueError(f"{label} must be one of {', '.join(COMPILE_MODES)} {also}, got {value!r}")
