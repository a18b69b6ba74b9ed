"""IMM, Implicit Modality Mining: detector-free multimodal named entities and relations in tweets.

The Python API, on the same engine as the server (``engine``)::

    import imm

    nlp = imm.load()                             # the packaged bundles; or a directory with ner/ and re/, or one bundle
    answer = nlp("Kevin Durant joins the Warriors")   # what the loaded models answer: here extract
    answer.relations[0].head_entity.text, answer.to_dict()
    nlp.ner("Alice Smith is in Paris", image="photo.jpg").entities
    nlp.re("Alice Smith moved to Paris", head=(0, 11), tail=(21, 26)).relation
    for answer in nlp.pipe(tweets, batch_size=32, errors="return"): ...

Answers are the API's typed objects (``imm.NERResponse``, ``REResponse``, ``ExtractResponse``),
with ``to_dict()`` and ``to_json()`` (the HTTP API's JSON); a ``pipe`` item that fails is named by
its index (``imm.PipeError``). Errors are the engine's (``imm.InvalidInput``, ``InputTooLarge``,
``ModelUnavailable``, ...) and the picture errors of the shared preprocessing (``imm.ImageError``). ``await imm.load_async(...)``
gives the same calls as coroutines, on the caller's event loop. Commands: ``imm --help`` (or
``python -m imm --help``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from engine.answers import Answer, EntityOut, ExtractResponse, NERResponse, RelationOut, REResponse
from engine.errors import (
    DeadlineExceeded,
    EngineError,
    InputTooLarge,
    InvalidInput,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)
from imm.api import IMM, AsyncIMM, PipeError, load, load_async
from model.preprocessing import ImageError

__all__ = [
    "DISTRIBUTION",
    "Answer",
    "IMM",
    "AsyncIMM",
    "DeadlineExceeded",
    "EngineError",
    "EntityOut",
    "ExtractResponse",
    "ImageError",
    "InputTooLarge",
    "InvalidInput",
    "ModelUnavailable",
    "NERResponse",
    "Overloaded",
    "PipeError",
    "REResponse",
    "RelationOut",
    "ShuttingDown",
    "__version__",
    "load",
    "load_async",
]

#: The name it is installed by (``pip install implicit-modality-mining``); on the registry, ``imm``
#: is another project's.
DISTRIBUTION = "implicit-modality-mining"
try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # imported from a checkout that was never installed (pip install -e .)
    __version__ = "0+unknown"
