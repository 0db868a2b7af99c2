"""Checkpoint interchange with other ecosystems.

``hf``: Hugging Face Llama export/import (``python -m genjax.interop.hf``);
``safetensors``: the numpy reader/writer it uses. Not imported here, so
``python -m genjax.interop.hf`` runs the module once, as ``__main__``.
"""
