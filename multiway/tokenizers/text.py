"""SentencePiece text tokenizer with the XLM-R (fairseq) id conventions used by BEiT-3.

BEiT-3 tokenizes with ``transformers.XLMRobertaTokenizer("beit3.spm")``. That tokenizer re-maps the raw
SentencePiece ids so that the fairseq specials come first::

    <s>=0  <pad>=1  </s>=2  <unk>=3  piece i (i >= 3 in the spm model) -> i + 1   <mask> = len(spm) + 1

``vocab_size`` is ``len(spm) + 2`` (64002 for ``beit3.spm``). The model's text embedding table must have at
least that many rows (the official one has 64010). This module reproduces those ids with ``sentencepiece``
alone, so transformers is not needed at run time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID

FAIRSEQ_OFFSET = 1


class TextTokenizer:
    """A SentencePiece model read from a local ``.spm``/``.model`` file, with XLM-R special ids.

    Args:
        model_file: path of the SentencePiece model (e.g. the official ``beit3.spm``).
    """

    bos_id = BOS_ID
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_file = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        # the spm model must put <unk>, <s>, </s> at 0, 1, 2 (sentencepiece's default and XLM-R's layout)
        if self.sp.unk_id() != 0:
            raise ValueError(f"{path}: expected <unk> at spm id 0 (XLM-R layout), got {self.sp.unk_id()}")

    def __len__(self) -> int:
        return self.vocab_size

    @classmethod
    def from_bytes(cls, model_proto: bytes, source: str = "<embedded>") -> TextTokenizer:
        """The tokenizer of a serialized SentencePiece model (the bytes of a ``.spm`` file, e.g. the copy a
        model file embeds); ``source`` names it in messages."""
        import sentencepiece as spm

        if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
            raise ValueError(f"{source}: expected the bytes of a SentencePiece model, got {type(model_proto).__name__}")
        self = cls.__new__(cls)
        self.model_file = source
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
        except RuntimeError as e:
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from e
        if self.sp.unk_id() != 0:
            raise ValueError(f"{source}: expected <unk> at spm id 0 (XLM-R layout), got {self.sp.unk_id()}")
        return self

    def serialized(self) -> bytes:
        """The SentencePiece model as bytes (what :meth:`from_bytes` reads back)."""
        return self.sp.serialized_model_proto()

    def __getstate__(self) -> dict:  # SentencePieceProcessor pickles poorly across dataloader workers
        if Path(self.model_file).is_file():
            return {"model_file": self.model_file}
        return {"model_proto": self.serialized(), "model_file": self.model_file}

    def __setstate__(self, state: dict) -> None:
        if "model_proto" in state:
            self.__dict__.update(TextTokenizer.from_bytes(state["model_proto"], state["model_file"]).__dict__)
        else:
            self.__init__(state["model_file"])

    @property
    def num_pieces(self) -> int:
        """Pieces in the SentencePiece model (64000 for ``beit3.spm``)."""
        return len(self.sp)

    @property
    def vocab_size(self) -> int:
        """Like ``XLMRobertaTokenizer.vocab_size``: pieces + fairseq offset + ``<mask>`` = ``len(spm) + 2``."""
        return len(self.sp) + FAIRSEQ_OFFSET + 1

    @property
    def mask_id(self) -> int:
        """``<mask>``, right after the vocabulary: ``len(spm) + 1``."""
        return len(self.sp) + FAIRSEQ_OFFSET

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (BOS_ID, PAD_ID, EOS_ID, self.mask_id)

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _to_fairseq(self, spm_id: int) -> int:
        if spm_id == self.sp.unk_id():
            return UNK_ID
        if spm_id == self.sp.bos_id():
            return BOS_ID
        if spm_id == self.sp.eos_id():
            return EOS_ID
        return spm_id + FAIRSEQ_OFFSET

    def text_to_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (what the official indexes store as ``text_segment``).

        Lone UTF-16 surrogates (JSON escapes such as ``"\\ud800"``) have no UTF-8 form, which SentencePiece needs;
        they become U+FFFD (and so ``<unk>``)."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return [self._to_fairseq(i) for i in self.sp.encode(text)]

    def encode(self, text: str | Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
        """``[<s>] ids[:max_len-2] [</s>]`` right-padded with ``<pad>`` to ``max_len``.

        ``text`` is a string or already-converted ids without specials (an index's ``text_segment``).
        Returns ``(ids, padding_mask)``, both of length ``max_len``; ``padding_mask`` is 1 on pads.
        """
        _check_max_len(max_len)
        if isinstance(text, str):
            ids = self.text_to_ids(text)
        else:
            ids = self._checked_ids(text)
        ids = [BOS_ID] + ids[: max_len - 2] + [EOS_ID]
        n = len(ids)
        return ids + [PAD_ID] * (max_len - n), [0] * n + [1] * (max_len - n)

    def _checked_ids(self, ids: object) -> list[int]:
        """Already-converted ids (an index's ``text_segment``): integers in ``[0, vocab_size)``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, Sequence) or isinstance(ids, (bytes, bytearray)):
            raise TypeError(f"text must be a string or a sequence of token ids, got {type(ids).__name__}")
        out = []
        for position, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"token id at position {position} must be an int, got {type(value).__name__} {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"token id {value} at position {position} is outside the vocabulary [0, {self.vocab_size})")
            out.append(value)
        return out

    def __call__(self, texts: str | Iterable[str | Sequence[int]], max_len: int = 64) -> dict[str, torch.Tensor]:
        """Batch-encode; returns ``{"language_tokens": (B,T) long, "padding_mask": (B,T) long}``."""
        _check_max_len(max_len)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: pass at least one string (an empty string encodes as <s> </s>)")
        rows = []
        for index, text in enumerate(texts):
            try:
                rows.append(self.encode(text, max_len))
            except (TypeError, ValueError) as e:
                raise type(e)(f"texts[{index}]: {e}") from e
        return {
            "language_tokens": torch.tensor([r[0] for r in rows], dtype=torch.long).view(len(rows), max_len),
            "padding_mask": torch.tensor([r[1] for r in rows], dtype=torch.long).view(len(rows), max_len),
        }

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence. Stops nowhere: pads and specials are dropped when ``skip_special_tokens``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        named = {BOS_ID: "<s>", PAD_ID: "<pad>", EOS_ID: "</s>", self.mask_id: "<mask>"}
        out: list[str] = []
        run: list[int] = []  # spm ids decoded together so word boundaries come out right
        for i in ids:
            i = int(i)
            if i in named:
                if skip_special_tokens:
                    continue
                out.append(self.sp.decode(run))
                run = []
                out.append(named[i])
            elif i == UNK_ID:
                run.append(self.sp.unk_id())
            elif FAIRSEQ_OFFSET < i < self.mask_id:
                run.append(i - FAIRSEQ_OFFSET)
            else:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        out.append(self.sp.decode(run))
        return "".join(out)

    def batch_decode(self, batch: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]


def _check_max_len(max_len: object) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for <s> and </s>), got {max_len}")


def train_text_tokenizer(
    corpus_files: Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    hard_vocab_limit: bool = True,
) -> Path:
    """Train a SentencePiece model on text files (one sentence per line); returns ``<out_prefix>.model``.

    The model keeps sentencepiece's default special layout (``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece),
    which is the XLM-R layout :class:`TextTokenizer` expects. The resulting tokenizer has
    ``vocab_size + 2`` ids, so a model's text embedding needs at least that many rows. With
    ``hard_vocab_limit=False`` a small corpus may yield fewer than ``vocab_size`` pieces instead of an error.
    """
    import sentencepiece as spm

    files = [str(f) for f in corpus_files]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"corpus file not found: {f}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(spm, "set_random_generator_seed"):  # sentence sampling is random; make it reproducible
        spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=files,
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=min(4, os.cpu_count() or 1),
        hard_vocab_limit=hard_vocab_limit,
        minloglevel=2,
    )
    return out_prefix.with_name(out_prefix.name + ".model")
