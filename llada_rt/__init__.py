"""llada_rt: a compiled inference runtime for masked diffusion language models (LLaDA)."""
from .runtime import GenerationResult, Runtime

__version__ = "0.1.0"
__all__ = ["Runtime", "GenerationResult", "__version__"]
