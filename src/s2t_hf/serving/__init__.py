"""
S2T on a serving engine: the student served by vLLM, the trigger evaluated inside the engine, the selection made by
stop-and-resume from the client.

- [`export_for_vllm`]: the checkpoint with the reserved rows baked in, the selector's LoRA, the manifest;
- `s2t_hf.serving.vllm_processor.S2TVllmLogitsProcessor`: the logits processor loaded into the server
  (`--logits-processors`); it imports vLLM;
- [`ServedS2T`]: the client driver (sync and asyncio).

The names load on first use: the server imports the processor without the training stack (PEFT), the client without
vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


_LAZY_ATTRIBUTES = {
    "MANIFEST_NAME": "manifest",
    "VLLM_PROCESSOR": "manifest",
    "ServingManifest": "manifest",
    "VllmExport": "export",
    "export_for_vllm": "export",
    "ServedCompletion": "client",
    "ServedS2T": "client",
    "ServedS2TError": "client",
}

__all__ = sorted(_LAZY_ATTRIBUTES)

if TYPE_CHECKING:
    from .client import ServedCompletion, ServedS2T, ServedS2TError
    from .export import VllmExport, export_for_vllm
    from .manifest import MANIFEST_NAME, VLLM_PROCESSOR, ServingManifest


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_ATTRIBUTES])
