"""The PyTorch runtime: the bundle's model rebuilt from ``model/``, run on a GPU with CUDA graphs.

Loading: the model is rebuilt from the bundle's config and its graph's own weights (the manifest's
``weights`` table, ``export.graph.rebuild_model``: int8 weights dequantised), so one bundle
directory serves on both runtimes with nothing else to download. A bundle whose visual path was
never trained runs its text stream alone, as its ONNX graph does.

Running (``device="cuda"``): fp16 weights and activations; for each bucket of batch size (powers
of two up to ``max_batch_size``), sequence length (16, 32, 64, 128 pieces) and pictures (none, or
one slot per row) a CUDA graph is captured at start-up, holding the model AND the CRF's batched
Viterbi and marginals (``model.crf``), so a batch costs a few host-to-device copies into static
buffers (from pinned memory, asynchronously), one graph replay and one copy back. JPEGs are
decoded by nvJPEG in one batched call and resized and normalised on the GPU
(``model.preprocessing.tensor_image``); other formats arrive decoded by the CPU path.

On the CPU (``device="cpu"``: tests, and machines without a GPU that still want this runtime) the
same code runs in fp32, eagerly, without graphs; ``bucketed=True`` still pads batches to the
buckets, so the padding logic the GPU relies on is tested on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from engine.runtimes.base import ModelPicture, Runtime, UndecodedJpeg
from export.bundle import CRF_KEYS, Bundle
from export.graph import graph_module, rebuild_model
from export.outputs import NEROutput
from model.config import IMMConfig
from model.crf import CRF
from model.preprocessing import EncodedText, Preprocessor
from model.preprocessing.tensor_image import decode_jpegs, nvjpeg_available, resize_normalise
from model.tasks import task_spec

__all__ = ["TorchRuntime"]

log = logging.getLogger("engine.runtimes")

SEQUENCE_BUCKETS = (16, 32, 64, 128)


def _batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    sizes = {1 << n for n in range(max_batch_size.bit_length()) if 1 << n <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def _bucket(value: int, sizes: Sequence[int]) -> int:
    return next((size for size in sizes if size >= value), sizes[-1])


class _Forward(torch.nn.Module):
    """Model plus decoding: the whole of what one batch computes on the device. ``crf`` (a task
    with a CRF) decodes the graph's emissions; without one the logits become probabilities."""

    def __init__(self, graph: torch.nn.Module, task: str, crf: CRF | None):
        super().__init__()
        self.graph = graph
        self.input_names = task_spec(task).graph_inputs
        self.crf = crf

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        output = self.graph(*(inputs[name] for name in self.input_names))
        if self.crf is not None:
            return self.crf.decode_batch(output, inputs["word_mask"])
        return (torch.softmax(output.float(), dim=-1),)


@dataclass
class _Shape:
    batch: int
    sequence: int
    pictures: int  # 0, or one slot per row

    @property
    def words(self) -> int:
        return self.sequence  # word_index points into the sequence: never more words than pieces


class _Bucket:
    """Static device buffers of one shape, pinned host twins, and (on CUDA) the captured graph."""

    def __init__(self, shape: _Shape, forward: _Forward, device: torch.device, dtype: torch.dtype, size: int):
        self.shape = shape
        self.forward = forward
        self.device = device
        pin = device.type == "cuda"
        b, length, words = shape.batch, shape.sequence, shape.words
        specs = {
            "input_ids": ((b, length), torch.long),
            "attention_mask": ((b, length), torch.long),
            "word_index": ((b, words), torch.long),
            "word_shape": ((b, words), torch.long),
            "word_mask": ((b, words), torch.bool),
            "has_image": ((b,), torch.bool),
            "marker_index": ((b, 2), torch.long),
        }
        self.host = {name: torch.zeros(s, dtype=t, pin_memory=pin) for name, (s, t) in specs.items()}
        self.inputs = {name: torch.zeros(s, dtype=t, device=device) for name, (s, t) in specs.items()}
        self.inputs["pixel_values"] = torch.zeros((shape.pictures, 3, size, size), dtype=dtype, device=device)
        self.host_pixels = torch.zeros((shape.pictures, 3, size, size), dtype=torch.float32, pin_memory=pin)
        self.outputs: tuple[torch.Tensor, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def fill(self, arrays: dict[str, np.ndarray]) -> None:
        """Copies a collated batch into the buffers; padding rows get one dummy token and word."""
        for name, host in self.host.items():
            view = host.numpy()
            view[...] = 0
            if name in arrays:
                source = arrays[name]
                view[tuple(slice(0, n) for n in source.shape)] = source
        real = len(arrays["input_ids"])
        self.host["attention_mask"].numpy()[real:, 0] = 1  # no fully masked row (its softmax is NaN)
        self.host["word_mask"].numpy()[real:, 0] = True
        for name, host in self.host.items():
            self.inputs[name].copy_(host, non_blocking=True)

    def capture(self, pool, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (cuBLAS handles, autotuning)
                self.forward(self.inputs)
        stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.outputs = self.forward(self.inputs)

    def run(self) -> tuple[torch.Tensor, ...]:
        if self.graph is None:
            return self.forward(self.inputs)
        self.graph.replay()
        assert self.outputs is not None
        return self.outputs


class TorchRuntime(Runtime):
    """See the module's docstring."""

    def __init__(
        self,
        bundle: Bundle,
        preprocessor: Preprocessor,
        *,
        device: str = "cuda",
        cuda_graphs: bool = True,
        max_batch_size: int = 16,
        bucketed: bool | None = None,
    ):
        super().__init__(bundle, preprocessor)
        manifest = bundle.manifest
        if "weights" not in manifest or "source" not in manifest:
            raise ValueError(
                f"bundle {bundle.directory} predates the PyTorch runtime (its manifest has no weights table): "
                "re-export it with python -m export"
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"IMM_DEVICE={device}: PyTorch sees no CUDA device")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.visual = bool(manifest.get("visual_stream", True))
        config = IMMConfig.from_dict(manifest["source"]["config"])
        model = rebuild_model(config, bundle.model_path, manifest["weights"])
        self.has_crf = task_spec(self.task).has_crf
        crf = None
        if self.has_crf:
            assert bundle.crf is not None
            crf = CRF.from_scores(*(torch.from_numpy(bundle.crf[key]) for key in CRF_KEYS))
        self.forward = _Forward(graph_module(model, self.visual), self.task, crf).to(self.device).eval()
        self.forward.graph.to(self.dtype)
        self.size = config.preprocessing.image_size
        self.decodes_jpeg = self.device.type == "cuda" and self.visual and nvjpeg_available()
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.bucketed = self.use_graphs if bucketed is None else bucketed
        self.batch_sizes = _batch_buckets(max_batch_size)
        self.sequences = tuple(n for n in SEQUENCE_BUCKETS if n < config.preprocessing.max_seq_len) + (
            config.preprocessing.max_seq_len,
        )
        self.buckets: dict[tuple[int, int, int], _Bucket] = {}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.use_graphs:
            self._capture_all()

    @property
    def provider(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        graphs = ", CUDA graphs" if self.use_graphs else ""
        return f"torch {precision} on {self.device} ({name}{graphs})"

    # -- buckets ----------------------------------------------------------------------------------
    def _bucket_for(self, batch: int, sequence: int, with_pictures: bool) -> _Bucket:
        shape = _Shape(
            _bucket(batch, self.batch_sizes),
            _bucket(sequence, self.sequences),
            0,
        )
        shape.pictures = shape.batch if with_pictures else 0
        key = (shape.batch, shape.sequence, shape.pictures)
        if key not in self.buckets:
            self.buckets[key] = _Bucket(shape, self.forward, self.device, self.dtype, self.size)
        return self.buckets[key]

    def _capture_all(self) -> None:
        """One CUDA graph per bucket, sharing one memory pool; the buffers hold a valid dummy batch."""
        pool = torch.cuda.graph_pool_handle()
        picture_modes = (False, True) if self.visual else (False,)
        with torch.inference_mode():
            for batch in self.batch_sizes:
                for sequence in self.sequences:
                    for pictures in picture_modes:
                        bucket = self._bucket_for(batch, sequence, pictures)
                        bucket.fill(self._dummy(batch))
                        bucket.capture(pool, self.stream)
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs (%s)", len(self.buckets), self.provider)

    def _dummy(self, batch: int) -> dict[str, np.ndarray]:
        return {
            "input_ids": np.zeros((batch, 1), dtype=np.int64),
            "attention_mask": np.ones((batch, 1), dtype=np.int64),
            "word_index": np.zeros((batch, 1), dtype=np.int64),
            "word_shape": np.zeros((batch, 1), dtype=np.int64),
            "word_mask": np.ones((batch, 1), dtype=bool),
            "has_image": np.zeros((batch,), dtype=bool),
            "marker_index": np.zeros((batch, 2), dtype=np.int64),
        }

    # -- one batch -------------------------------------------------------------------------------
    def infer(
        self, texts: Sequence[EncodedText], images: Sequence[ModelPicture | None]
    ) -> NEROutput | np.ndarray:
        if not self.visual:
            images = [None] * len(texts)
        arrays = self.preprocessor.collate(texts, [None] * len(texts))  # the text arrays
        has_image = np.array([image is not None for image in images], dtype=bool)
        arrays["has_image"] = has_image
        pictures = [image for image in images if image is not None]
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with torch.inference_mode(), on_stream:
            if self.bucketed:
                bucket = self._bucket_for(len(texts), arrays["input_ids"].shape[1], bool(pictures))
                bucket.fill(arrays)
                self._pictures(pictures, bucket.inputs["pixel_values"], bucket.host_pixels)
                outputs = bucket.run()
            else:
                inputs = {name: torch.from_numpy(value).to(self.device) for name, value in arrays.items()}
                pixels = torch.zeros(
                    (len(pictures), 3, self.size, self.size), dtype=self.dtype, device=self.device
                )
                self._pictures(pictures, pixels, torch.zeros(pixels.shape, dtype=torch.float32))
                inputs["pixel_values"] = pixels
                outputs = self.forward(inputs)
            host = [output.to("cpu", non_blocking=True) for output in outputs]
            if self.stream is not None:
                self.stream.synchronize()
        batch = len(texts)
        if not self.has_crf:
            return host[0][:batch].double().numpy()
        tags, confidence = (tensor[:batch].numpy() for tensor in host)
        lengths = [text.num_words for text in texts]
        return NEROutput(
            [tags[row, :n].copy() for row, n in enumerate(lengths)],
            [confidence[row, :n].astype(np.float64) for row, n in enumerate(lengths)],
        )

    def _pictures(self, pictures: Sequence[ModelPicture], target: torch.Tensor, host: torch.Tensor) -> None:
        """Writes the batch's pictures, in order, into the first rows of ``target`` on the device."""
        if not pictures:
            return
        decoded = [None] * len(pictures)
        jpegs = [n for n, p in enumerate(pictures) if isinstance(p, UndecodedJpeg)]
        if jpegs:
            for number, image in zip(jpegs, decode_jpegs([pictures[n].data for n in jpegs], self.device)):
                decoded[number] = image
        on_device = [n for n, image in enumerate(decoded) if image is not None]
        if on_device:
            scratch = torch.empty(
                (len(on_device), 3, self.size, self.size), dtype=torch.float32, device=self.device
            )
            mean, std = self.preprocessor.config.image_mean, self.preprocessor.config.image_std
            resize_normalise([decoded[n] for n in on_device], self.size, mean, std, out=scratch)
            target[on_device] = scratch.to(target.dtype)
        for number, picture in enumerate(pictures):
            if decoded[number] is not None:
                continue
            # Decoded on the CPU: pixels from the pipeline, or a JPEG nvJPEG refused (Pillow then
            # decodes it, or names what is wrong with it).
            pixels = picture if isinstance(picture, np.ndarray) else self.preprocessor.image(picture.data)
            host[number].numpy()[...] = pixels
            target[number].copy_(host[number], non_blocking=True)
