"""flashc: a compiler-style optimizer for PyTorch models, LLMs first.

    import flashc
    cm = flashc.compile(model, target="cpu", example_inputs=(input_ids,))
    print(cm.report())
    cm.save("out/llama")
    cm2 = flashc.load("out/llama")
"""

__version__ = "0.1.0"

from flashc.api import compile, optimize, why_not  # noqa: E402
from flashc.compiled import CompiledModel, load  # noqa: E402
from flashc.errors import (  # noqa: E402
    ArtifactError, CaptureError, FlashcError, InputError, UnknownNameError, UnsupportedOpError,
)
from flashc.profiles import HardwareProfile, detect, get_profile  # noqa: E402

__all__ = ["compile", "optimize", "why_not", "load", "CompiledModel", "HardwareProfile", "detect", "get_profile", "FlashcError",
           "CaptureError", "UnsupportedOpError", "ArtifactError", "InputError", "UnknownNameError", "__version__"]
