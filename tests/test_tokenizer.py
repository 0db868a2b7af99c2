"""Tokenizer: exact round trips on any text, compression of code, clear errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genjax.data.corpus import read_texts, split_by_module, stdlib_files
from genjax.tokenizer import MIN_VOCAB_SIZE, Tokenizer

VOCAB_SIZE = 800


@pytest.fixture(scope="module")
def corpus():
    """(train texts, held-out texts): stdlib modules on opposite sides of the split."""
    train, val = split_by_module(stdlib_files())
    # A slice of the stdlib keeps training well under a second.
    return [t for _, t in read_texts(train[::20])], [t for _, t in read_texts(val)]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    return Tokenizer.train(corpus[0], vocab_size=VOCAB_SIZE, model_path=path)


ADVERSARIAL = [
    "",
    "\n",
    "\n\n\n",
    "\r",
    "\r\n",
    "a\r\nb\r\n",
    "\t",
    "\t\t",
    "\tx\t",
    "    x",
    "x    ",
    " ",
    " leading and trailing ",
    "a  \n  b",
    "def f():\n    return 1\n\n\n",
    " " * 1000,
    "\n" * 300,
    "x" + " " * 37 + "y",
    "🙂👍🏽",
    "👨‍👩‍👧‍👦",
    "\x00",
    "a\x00b\x00",
    "\x01\x02\x1b[31m\x7f\x85",
    "\u2028\u2029\x0b\x0c\x1c",
    "\ufeffBOM",
    "\u200b\u200d zero width",
    "Grüße, мир, 世界, عالم, שלום, ｆｕｌｌｗｉｄｔｈ",
    "ﬁ ligature, e\u0301 combining, Å vs Å",
    "\u3000ideographic space",
    "\U0010ffff\U000e0001\ue000",  # max code point, tag char, private use
    # sentencepiece's own meta characters and piece spellings are ordinary text.
    "▁",
    "▁▁ ▁",
    "a▁b",
    " ▁ \n▁",
    "⁇",
    "<unk>",
    "<eod>",
    "<pad>",
    "<s></s>",
    "<0x41>",
]


def _check_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Text never produces the specials: <eod> must only ever mean end of document.
    assert not {tokenizer.eos_id, tokenizer.pad_id, 1} & set(ids)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_adversarial(tokenizer, text):
    _check_round_trip(tokenizer, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
def test_round_trip_any_unicode(tokenizer, text):
    _check_round_trip(tokenizer, text)


# Random text over every code point rarely hits runs of whitespace or the
# characters sentencepiece treats specially; this alphabet hits them constantly.
_NASTY = st.sampled_from(
    [" ", "  ", "\n", "\r", "\t", "▁", "\x00", "⁇", "a", "e", "<", ">", "0x", "🙂", "é", "\u0301"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_NASTY, max_size=60).map("".join))
def test_round_trip_whitespace_and_meta_characters(tokenizer, text):
    _check_round_trip(tokenizer, text)


def test_literal_meta_space_is_not_a_space(tokenizer):
    assert tokenizer.encode("▁") != tokenizer.encode(" ")
    assert tokenizer.decode(tokenizer.encode("a▁ b")) == "a▁ b"


def test_encode_batch_matches_encode(tokenizer):
    texts = ADVERSARIAL + ["import os\n", "▁x▁"] * 5
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch([]) == []


def test_vocab_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.decode([tokenizer.eos_id]) == ""
    assert tokenizer.eos_id != tokenizer.pad_id


def test_newlines_and_indentation_are_learned_pieces(tokenizer):
    # One id each (not byte fallback) shows newlines reached the trainer.
    assert len(tokenizer.encode("\n")) == 1
    assert len(tokenizer.encode(":\n")) == 1
    assert len(tokenizer.encode("        ")) == 1


def test_compresses_held_out_python(tokenizer, corpus):
    held_out = max(corpus[1], key=len)
    num_bytes = len(held_out.encode())
    assert num_bytes > 10_000
    assert len(tokenizer.encode(held_out)) / num_bytes < 0.5


def test_load_gives_the_same_tokenizer(tokenizer, corpus):
    loaded = Tokenizer.load(tokenizer.model_path)
    text = corpus[1][0][:5000]
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size


def test_training_is_deterministic(corpus, tmp_path):
    texts = corpus[0][:5]
    a = Tokenizer.train(texts, vocab_size=400, model_path=tmp_path / "a.model", seed=3)
    b = Tokenizer.train(texts, vocab_size=400, model_path=tmp_path / "b.model", seed=3)
    assert a.model_proto == b.model_proto


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "nope.model")


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "bad.model"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.load(path)


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE - 1, model_path=tmp_path / "m")


def test_vocab_too_large_for_corpus(tmp_path):
    with pytest.raises(ValueError, match="could not train with vocab_size=50000"):
        Tokenizer.train(["tiny corpus"] * 10, vocab_size=50_000, model_path=tmp_path / "m")


def test_train_on_nothing(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([], vocab_size=400, model_path=tmp_path / "m")


def test_load_refuses_a_sentencepiece_model_that_normalizes(corpus, tmp_path):
    """<eod> at id 2 and byte pieces, but sentencepiece's default normalization: it would
    lose spaces and rewrite characters, so it is not a genjax tokenizer."""
    import io

    import sentencepiece as spm

    from genjax import tokenizer as toklib

    writer = io.BytesIO()
    options = toklib._trainer_options(VOCAB_SIZE, 50_000, 1) | {
        "normalization_rule_name": "nmt_nfkc", "add_dummy_prefix": True,
        "remove_extra_whitespaces": True,
    }  # fmt: skip
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[0][:50]), model_writer=writer,
                                   **options)  # fmt: skip
    path = tmp_path / "normalizing.model"
    path.write_bytes(writer.getvalue())
    with pytest.raises(ValueError, match=r"would not give text back exactly \(normalization 'nmt"):
        Tokenizer.load(path)


def test_text_that_is_not_valid_unicode_is_a_clear_error(tokenizer):
    """An argv whose bytes are not UTF-8 reaches Python as lone surrogates."""
    with pytest.raises(ValueError, match=r"cannot encode 'caf\\udce9'.*valid Unicode"):
        tokenizer.encode("caf\udce9")


def test_lines_longer_than_a_training_sentence_are_learned(tmp_path):
    """sentencepiece skips a sentence over 16 KB: an 18,000-character line goes in pieces."""
    text = "zq" * 9000
    tok = Tokenizer.train([text, "x = 1\n" + text], vocab_size=265, model_path=tmp_path / "m")
    assert len(tok.encode("zq" * 8)) <= 2  # a learned piece, not 16 bytes
    assert tok.decode(tok.encode(text)) == text
