"""IMM: Implicit Modality Mining for multimodal NER and relation extraction.

Kept light on purpose: importing ``model`` (or ``model.preprocessing``, ``model.decoding``,
``model.config``) must not import torch, because the server imports those modules and runs
without it. The PyTorch parts live in their own modules (``model.modeling`` and below).
"""

__version__ = "0.1.0"
