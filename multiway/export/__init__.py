"""Export a model part to ONNX (``torch.onnx.export``) or a ``torch.export`` program (``.pt2``).

Every exported graph carries the preprocessing that must travel with the weights, so that another stack only has
to resize the image and tokenize the text:

* image inputs are ``pixels``: (B, 3, S, S) float32 in [0, 1] (S = the model's ``img_size``); the task's
  normalisation constants (mean/std) are applied inside the graph;
* text inputs are token ids (B, T) int64, right-padded with the pad id (1); the padding mask is computed from
  the ids inside the graph.

The batch size is dynamic, and so is the text length T (2 <= T <= ``max_text_positions - 2``). Parts:

=====================  ============  ============================================  =====================================
part                   model         inputs                                        outputs
=====================  ============  ============================================  =====================================
``vision``             retrieval     pixels                                        image_embeds (B, D) unit vectors
``text``               retrieval     text_ids                                      text_embeds (B, D) unit vectors
``retrieval``          retrieval     pixels (Bi), text_ids (Bt)                    image_embeds, text_embeds,
                                                                                   similarity (Bi, Bt) cosine
``vqav2``              vqav2         pixels, question_ids (same B)                 logits (B, num_answers)
``captioning-encoder`` captioning    pixels                                        image_states (B, 1+N, D)
=====================  ============  ============================================  =====================================

Caption *generation* (beam search on the KV cache) is not exportable: its loop length and beam reordering depend
on the data. Asking for it raises :class:`ExportError`; export ``captioning-encoder`` and decode in PyTorch.

>>> spec = export_model("runs/retrieval", part="vision", fmt="onnx", out="vision.onnx")
>>> spec.max_abs_diff                       # onnxruntime vs PyTorch eager on a check batch, fp32
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..constants import PAD_ID

PARTS = ("vision", "text", "retrieval", "vqav2", "captioning-encoder")
FORMATS = ("onnx", "pt2")
# Parts users ask for that cannot become a static graph, with the reason and what to export instead.
UNEXPORTABLE = {
    "captioning": "caption generation is beam search on a KV cache: the number of decoding steps, the finished beams "
                  "and the beam reordering depend on the data, so no fixed graph represents it; export "
                  "--part captioning-encoder and run the decoding loop in PyTorch",
    "nlvr2": "the NLVR2 head is not one of the exportable parts; choose one of " + ", ".join(PARTS),
}
PARITY_TOLERANCE = 1e-4  # onnxruntime vs eager, fp32


class ExportError(RuntimeError):
    """A part that cannot be exported, or an export whose output does not match PyTorch eager."""


@dataclass
class ExportSpec:
    """What an exported file holds, stored inside it (ONNX ``metadata_props['multiway']``, pt2 ``multiway.json``)."""

    part: str
    format: str
    model: str
    inputs: list[str]
    outputs: list[str]
    img_size: int
    mean: list[float]
    std: list[float]
    pad_id: int = PAD_ID
    max_text_len: int = 0
    embed_dim: int = 0
    labels: list[str] | None = None
    max_abs_diff: float | None = None  # onnxruntime vs eager on the check batch (ONNX only)
    path: str = ""
    notes: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --- graphs: the model part with its preprocessing --------------------------------------------------------


class _Normalize(nn.Module):
    """(B, 3, S, S) pixels in [0, 1] -> the model's normalised input, constants stored as buffers in the graph."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        return (pixels - self.mean) / self.std


def text_padding_mask(ids: Tensor, pad_id: int = PAD_ID) -> Tensor:
    """(B, T) ids -> (B, T) long mask, 1 on pad positions (the convention of the text tokenizer)."""
    return ids.eq(pad_id).long()


class VisionEmbedder(nn.Module):
    """pixels (B, 3, S, S) in [0, 1] -> image_embeds (B, D), the dual encoder's unit vectors."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model, self.normalize = model, _Normalize(mean, std)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(self.normalize(pixels))


class TextEmbedder(nn.Module):
    """text_ids (B, T) int64 padded with ``pad_id`` -> text_embeds (B, D) unit vectors."""

    def __init__(self, model: nn.Module, pad_id: int = PAD_ID):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, text_ids: Tensor) -> Tensor:
        return self.model.encode_text(text_ids, text_padding_mask(text_ids, self.pad_id))


class RetrievalScorer(nn.Module):
    """pixels (Bi, 3, S, S), text_ids (Bt, T) -> image_embeds (Bi, D), text_embeds (Bt, D), similarity (Bi, Bt)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], pad_id: int = PAD_ID):
        super().__init__()
        self.vision, self.text = VisionEmbedder(model, mean, std), TextEmbedder(model, pad_id)

    def forward(self, pixels: Tensor, text_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image, text = self.vision(pixels), self.text(text_ids)
        return image, text, image @ text.t()


class VQAScorer(nn.Module):
    """pixels (B, 3, S, S), question_ids (B, T) -> logits (B, num_answers) (apply a sigmoid for scores)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], pad_id: int = PAD_ID):
        super().__init__()
        self.model, self.normalize, self.pad_id = model, _Normalize(mean, std), pad_id

    def forward(self, pixels: Tensor, question_ids: Tensor) -> Tensor:
        mask = text_padding_mask(question_ids, self.pad_id)
        return self.model(image=self.normalize(pixels), question=question_ids, padding_mask=mask)


class CaptioningEncoder(nn.Module):
    """pixels (B, 3, S, S) -> image_states (B, 1+N, D): the captioner's image tokens through its backbone. Under the
    captioning (image-to-text) mask the image tokens attend only to each other, so these states depend on the
    image alone."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model, self.normalize = model, _Normalize(mean, std)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.beit3.encode_image(self.normalize(pixels))


def normalization_of(transform) -> tuple[list[float], list[float]]:
    """(mean, std) of the ``Normalize`` step in a predictor's image transform (a torchvision/timm ``Compose``)."""
    steps = list(getattr(transform, "transforms", [transform]))
    for step in steps:
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean, std = [float(x) for x in step.mean], [float(x) for x in step.std]
            if len(mean) == len(std) == 3:
                return mean, std
    raise ExportError(f"cannot find the normalisation (a Normalize step) in the model's image transform {transform!r}")


def _model_kind(model: nn.Module) -> str:
    import multiway

    for cls, kind in ((multiway.BEiT3ForRetrieval, "retrieval"), (multiway.BEiT3ForVisualQuestionAnswering, "vqav2"),
                      (multiway.BEiT3ForCaptioning, "captioning")):
        if isinstance(model, cls):
            return kind
    return type(model).__name__


def build_graph(model: nn.Module, part: str, mean: Sequence[float], std: Sequence[float],
                pad_id: int = PAD_ID) -> tuple[nn.Module, list[str], list[str]]:
    """The module to export for ``part`` with its input and output names. Checks that ``model`` fits the part."""
    if part in UNEXPORTABLE:
        raise ExportError(f"--part {part} cannot be exported: {UNEXPORTABLE[part]}")
    if part not in PARTS:
        raise ExportError(f"unknown --part {part!r}; choose one of {', '.join(PARTS)}")
    needs = {"vqav2": "vqav2", "captioning-encoder": "captioning"}.get(part, "retrieval")
    kind = _model_kind(model)
    if kind != needs:
        raise ExportError(f"--part {part} needs a {needs} model, got a {kind} model")
    if part == "vision":
        return VisionEmbedder(model, mean, std), ["pixels"], ["image_embeds"]
    if part == "text":
        return TextEmbedder(model, pad_id), ["text_ids"], ["text_embeds"]
    if part == "retrieval":
        return RetrievalScorer(model, mean, std, pad_id), ["pixels", "text_ids"], ["image_embeds", "text_embeds", "similarity"]
    if part == "vqav2":
        return VQAScorer(model, mean, std, pad_id), ["pixels", "question_ids"], ["logits"]
    return CaptioningEncoder(model, mean, std), ["pixels"], ["image_states"]


def example_inputs(names: Sequence[str], img_size: int, vocab_size: int, batch: int = 3, text_len: int = 7,
                   seed: int = 0) -> tuple[Tensor, ...]:
    """Random check inputs: pixels in [0, 1]; text ids from the vocabulary after the specials, padded at the end of
    every other row, so the in-graph padding mask is exercised. Batch and length differ from 0/1 so the exporter
    keeps them symbolic. For ``retrieval`` the text batch differs from the image batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        if name == "pixels":
            out.append(torch.rand(batch, 3, img_size, img_size, generator=g))
        else:
            rows = batch + 1 if "pixels" in names and name == "text_ids" else batch
            ids = torch.randint(4, vocab_size, (rows, text_len), generator=g)
            ids[:, 0] = 0
            ids[::2, text_len - 2 :] = PAD_ID
            out.append(ids)
    return tuple(out)


def _dynamic_shapes(names: Sequence[str], max_text: int) -> dict:
    from torch.export import Dim

    batch, text_batch = Dim("batch", min=1, max=65536), Dim("text_batch", min=1, max=65536)
    text_len = Dim("text_len", min=2, max=max_text)
    shapes = {}
    for name in names:
        if name == "pixels":
            shapes[name] = {0: batch}
        else:  # text batch is its own dimension only beside an independent image batch (retrieval)
            shapes[name] = {0: text_batch if name == "text_ids" and "pixels" in names else batch, 1: text_len}
    return shapes


# --- the exporters ----------------------------------------------------------------------------------------


def _atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.partial.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    return Path(tmp)


def _torch_export(graph: nn.Module, inputs: tuple[Tensor, ...], names: Sequence[str], max_text: int, part: str):
    dynamic = _dynamic_shapes(names, max_text)
    try:
        return torch.export.export(graph, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # the exporter's own errors are many types; report which part failed and why
        raise ExportError(f"torch.export could not trace --part {part}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def onnx_outputs(path: str | os.PathLike, inputs: Sequence[Tensor] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run an exported ONNX file with onnxruntime (CPU) on ``inputs`` in the file's input order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: (x.numpy() if isinstance(x, Tensor) else x) for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def max_abs_diff(expected: Sequence[Tensor], got: Sequence[np.ndarray]) -> float:
    return max(float(np.abs(e.detach().numpy() - g).max()) if e.numel() else 0.0 for e, g in zip(expected, got))


def export_graph(graph: nn.Module, names: list[str], outputs: list[str], spec: ExportSpec, out: str | os.PathLike,
                 vocab_size: int, max_text: int, tolerance: float = PARITY_TOLERANCE) -> ExportSpec:
    """Export ``graph`` to ``out`` (format ``spec.format``). The file appears only when complete and, for ONNX,
    only when onnxruntime agrees with eager within ``tolerance`` on a check batch; otherwise :class:`ExportError`."""
    out = Path(out)
    graph = graph.eval()
    inputs = example_inputs(names, spec.img_size, vocab_size, text_len=min(7, max_text))
    with torch.no_grad():
        expected = graph(*inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    program = _torch_export(graph, inputs, names, max_text, spec.part)
    tmp = _atomic_target(out)
    try:
        if spec.format == "pt2":
            torch.export.save(program, str(tmp), extra_files={"multiway.json": spec.to_json()})
        else:
            _write_onnx(program, inputs, names, outputs, max_text, tmp, spec)
            # a second, differently shaped batch checks that the dynamic axes really are dynamic
            check = example_inputs(names, spec.img_size, vocab_size, batch=5, text_len=max(2, min(11, max_text)), seed=1)
            with torch.no_grad():
                want = graph(*check)
            want = list(want) if isinstance(want, tuple) else [want]
            diff = max(max_abs_diff(expected, onnx_outputs(tmp, inputs)), max_abs_diff(want, onnx_outputs(tmp, check)))
            if not diff <= tolerance:
                raise ExportError(f"--part {spec.part}: onnxruntime differs from PyTorch eager by {diff:.3g} (> {tolerance:g}); "
                                  "the file was not written")
            spec.max_abs_diff = diff
            _set_onnx_metadata(tmp, spec)
        spec.path = str(out)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return spec


def _write_onnx(program, inputs, names, outputs, max_text, path: Path, spec: ExportSpec) -> None:
    try:
        onnx_program = torch.onnx.export(program, inputs, input_names=list(names), output_names=list(outputs),
                                         dynamo=True, external_data=False, optimize=True)
        onnx_program.save(str(path), external_data=False)
    except ExportError:
        raise
    except Exception as e:  # the ONNX exporter raises many types; say which part failed and why
        raise ExportError(f"torch.onnx.export failed for --part {spec.part}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _set_onnx_metadata(path: Path, spec: ExportSpec) -> None:
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "multiway", spec.to_json()
    onnx.save(proto, str(path))


def read_spec(path: str | os.PathLike) -> ExportSpec:
    """The :class:`ExportSpec` stored in an exported ``.onnx`` or ``.pt2`` file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "multiway" not in props:
            raise ValueError(f"{path}: no 'multiway' metadata entry (not written by multiway export)")
        return ExportSpec(**json.loads(props["multiway"]))
    extra = {"multiway.json": ""}
    torch.export.load(str(path), extra_files=extra)
    if not extra["multiway.json"]:
        raise ValueError(f"{path}: no multiway.json entry (not written by multiway export)")
    return ExportSpec(**json.loads(extra["multiway.json"]))


def export_model(model: str | os.PathLike | nn.Module, part: str, fmt: str, out: str | os.PathLike,
                 tolerance: float = PARITY_TOLERANCE) -> ExportSpec:
    """Export ``part`` of ``model`` (a ``multiway finetune`` folder, a ``.safetensors`` file or a module) to ``out``.

    ``fmt``: ``onnx`` or ``pt2``. The model runs in fp32 on the CPU. Returns the :class:`ExportSpec` written into
    the file. Raises :class:`ExportError` for a part that cannot be exported or does not fit the model.
    """
    from ..downstream.predict import load_predictor

    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if part in UNEXPORTABLE or part not in PARTS:
        build_graph(nn.Module(), part, (0.5,) * 3, (0.5,) * 3)  # raises the part's error before loading anything
    pred = load_predictor(model, device="cpu")
    net = pred.model.float().eval()
    mean, std = normalization_of(pred.transform)
    graph, names, outputs = build_graph(net, part, mean, std)
    config = net.config
    max_text = int(config.max_text_positions) - 2  # fairseq-style positions start at 2 (pad + 1)
    spec = ExportSpec(part=part, format=fmt, model=str(model) if not isinstance(model, nn.Module) else type(model).__name__,
                      inputs=names, outputs=outputs, img_size=int(config.img_size), mean=mean, std=std,
                      max_text_len=max_text, embed_dim=int(config.embed_dim),
                      labels=pred.labels if part == "vqav2" else None)
    return export_graph(graph, names, outputs, spec, out, vocab_size=int(config.vocab_size), max_text=max_text, tolerance=tolerance)


__all__ = [
    "FORMATS",
    "PARTS",
    "CaptioningEncoder",
    "ExportError",
    "ExportSpec",
    "RetrievalScorer",
    "TextEmbedder",
    "VQAScorer",
    "VisionEmbedder",
    "build_graph",
    "example_inputs",
    "export_graph",
    "export_model",
    "max_abs_diff",
    "normalization_of",
    "onnx_outputs",
    "read_spec",
    "text_padding_mask",
]
