import shutil

import pytest
import torch

from multiway.tokenizers.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer, train_text_tokenizer

CORPUS = [
    "a small red circle is to the left of a big blue square",
    "two green triangles and one yellow star on a grey background",
    "Is the purple hexagon above the orange circle? yes",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 1234 and punctuation, like: semicolons; dashes - and (parentheses)!",
    "ünïcödé wörds and ☃ snowmen",
]

SAMPLES = [
    "a red circle",
    "A Big BLUE square, left of 2 stars!",
    "  extra   spaces\tand\ttabs  ",
    "unseen words: xylophone zebra quokka",
    "ünïcödé ☃ and 漢字",
    "",
    "The quick brown fox jumps over the lazy dog. " * 8,
]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    return train_text_tokenizer([corpus], d / "tiny", vocab_size=80)


def _xlmr(spm_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        # v5 converts a SentencePiece file found under its canonical name in a folder (same ids as v4's slow one)
        shutil.copy(spm_file, tmp_path / "sentencepiece.bpe.model")
        return transformers.XLMRobertaTokenizer.from_pretrained(str(tmp_path))
    return transformers.XLMRobertaTokenizer(str(spm_file))


def test_special_ids_and_sizes(spm_file):
    tok = TextTokenizer(spm_file)
    assert tok.num_pieces == 80
    assert tok.vocab_size == 82
    assert tok.mask_id == 81
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)


def test_ids_match_xlm_roberta_tokenizer(spm_file, tmp_path):
    ref = _xlmr(spm_file, tmp_path)
    tok = TextTokenizer(spm_file)
    assert ref.vocab_size == tok.vocab_size
    assert ref.mask_token_id == tok.mask_id
    assert (ref.bos_token_id, ref.pad_token_id, ref.eos_token_id, ref.unk_token_id) == (0, 1, 2, 3)
    for text in SAMPLES:
        # the official recipe: tokenize() then convert_tokens_to_ids()
        expected = ref.convert_tokens_to_ids(ref.tokenize(text))
        assert tok.text_to_ids(text) == expected, text
    assert UNK_ID in tok.text_to_ids("漢字")  # characters outside the corpus map to <unk>=3


def test_encode_truncates_wraps_and_pads(spm_file):
    tok = TextTokenizer(spm_file)
    raw = tok.text_to_ids(SAMPLES[-1])
    assert len(raw) > 20
    ids, pad = tok.encode(SAMPLES[-1], max_len=12)
    assert ids == [BOS_ID] + raw[:10] + [EOS_ID] and pad == [0] * 12
    ids, pad = tok.encode("a red circle", max_len=16)
    n = len(tok.text_to_ids("a red circle")) + 2
    assert ids[:n][0] == BOS_ID and ids[n - 1] == EOS_ID and ids[n:] == [PAD_ID] * (16 - n)
    assert pad == [0] * n + [1] * (16 - n)
    # pre-tokenized text_segment (ids without specials) gives the same result as the string
    assert tok.encode(tok.text_to_ids("a red circle"), 16) == (ids, pad)
    with pytest.raises(ValueError):
        tok.encode("x", max_len=1)


def test_batch_encode_and_decode_roundtrip(spm_file):
    tok = TextTokenizer(spm_file)
    batch = tok(["a red circle", "two green triangles on a grey background"], max_len=40)
    assert batch["language_tokens"].shape == (2, 40) and batch["language_tokens"].dtype == torch.long
    assert batch["padding_mask"].shape == (2, 40)
    assert (batch["language_tokens"][batch["padding_mask"].bool()] == PAD_ID).all()
    assert tok.batch_decode(batch["language_tokens"]) == ["a red circle", "two green triangles on a grey background"]
    with_specials = tok.decode([BOS_ID] + tok.text_to_ids("a red") + [tok.mask_id, EOS_ID], skip_special_tokens=False)
    assert with_specials == "<s>a red<mask></s>"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_tokenizer_pickles(spm_file):
    import pickle

    tok = pickle.loads(pickle.dumps(TextTokenizer(spm_file)))
    assert tok.text_to_ids("a red circle") == TextTokenizer(spm_file).text_to_ids("a red circle")


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.spm"):
        TextTokenizer(tmp_path / "nope.spm")


def test_bad_arguments_name_what_was_expected(spm_file):
    tok = TextTokenizer(spm_file)
    cases = [
        (lambda: tok.encode("x", max_len=1), ValueError, "max_len must be >= 2"),
        (lambda: tok.encode("x", max_len=8.0), TypeError, "max_len must be an int, got float"),
        (lambda: tok.encode([5, tok.vocab_size], 8), ValueError, rf"id {tok.vocab_size} at position 1 is outside the vocabulary \[0, "),
        (lambda: tok.encode([5, -2], 8), ValueError, "token id -2 at position 1"),
        (lambda: tok.encode([5, 2.5], 8), TypeError, "token id at position 1 must be an int, got float"),
        (lambda: tok.encode(b"bytes", 8), TypeError, "text must be a string or a sequence of token ids, got bytes"),
        (lambda: tok.encode(None, 8), TypeError, "got NoneType"),
        (lambda: tok([]), ValueError, "texts is empty"),
        (lambda: tok(["fine", 7]), TypeError, r"texts\[1\]: text must be a string or a sequence of token ids, got int"),
        (lambda: tok(["fine"], max_len=True), TypeError, "max_len must be an int, got bool"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    ids = tok.encode(torch.tensor([5, 6]), 6)[0]  # a tensor of ids is accepted
    assert ids == [BOS_ID, 5, 6, EOS_ID, PAD_ID, PAD_ID]
    assert tok([""])["language_tokens"].tolist() == [[BOS_ID, EOS_ID] + [PAD_ID] * 62]
