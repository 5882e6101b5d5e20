"""llada_rt: a compiled inference runtime for masked diffusion language models (LLaDA)."""
__version__ = "0.1.0"
__all__ = ["Runtime", "GenerationResult", "__version__"]


def __getattr__(name):
    # Runtime imports torch; importing it on first use keeps `import llada_rt` (and the llada-rt command's start,
    # where Ctrl-C must exit quietly) free of torch until it is needed.
    if name in ("Runtime", "GenerationResult"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'llada_rt' has no attribute {name!r}")
