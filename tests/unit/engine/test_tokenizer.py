"""The tokenizer layer on the tiny checkpoint: SentencePiece model, HF wrapper, chat template,
streaming detokenizer."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from cluster.catalog import architecture
from cluster.errors import CheckpointError, InvalidRequestError
from engine.tiny.corpus import corpus_lines
from engine.tokenizer import FALLBACK_CHAT_TEMPLATE_FILE, IncrementalDetokenizer, load_tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
MULTILINGUAL = [
    "Hello world! How are you today?",
    "The capital of France is Paris; 2 + 2 = 4 and 12345 is a number.",
    'def f(x):\n    return {"a": [1, 2.5, null]}',
    "Le café est très bon. ¿Dónde está la estación? Grüße aus München.",
    "你好，世界！今天天气很好。こんにちは 안녕하세요",
    "Emoji: 🦙🎉👩‍🚀 and rare letters ꙮ ǅ ẞ",
    "tabs\tand\nnewlines\n\n  two spaces",
]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def sp(tiny_checkpoint):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


def byte_ids(tok, text: str) -> list[int]:
    """``text`` spelled as byte-fallback tokens."""
    return [tok.hf_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode("utf-8")]


# --- the SentencePiece model -------------------------------------------------------------


def test_sentencepiece_model_has_llama2_settings(tiny_checkpoint, sp):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tiny_checkpoint / "tokenizer.model").read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    assert trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert (trainer.byte_fallback, trainer.split_digits) == (True, True)
    assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (0, 1, 2, -1)
    assert normalizer.name == "identity"
    assert normalizer.add_dummy_prefix and not normalizer.remove_extra_whitespaces
    assert sp.vocab_size() == architecture("tiny").vocab_size == 4096
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in (3, 3 + 0x0A, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]


def test_digits_are_split_and_no_piece_holds_two_digits(sp):
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]
    pieces = [sp.id_to_piece(i) for i in range(259, sp.vocab_size())]  # after <0x..> bytes
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]


def test_unknown_characters_fall_back_to_bytes(tok):
    ids = tok.encode("ꙮ", add_bos=False)  # not in the training corpus
    assert ids[-3:] == byte_ids(tok, "ꙮ")
    assert tok.decode(ids) == "ꙮ"
    assert tok.encode("\n", add_bos=False)[-1] == byte_ids(tok, "\n")[0]


def test_training_is_deterministic_and_depends_on_the_seed(tiny_checkpoint):
    from engine.tiny.checkpoint import train_tokenizer_model

    first = train_tokenizer_model(seed=0)
    assert first == train_tokenizer_model(seed=0)
    assert first == (tiny_checkpoint / "tokenizer.model").read_bytes()
    assert list(corpus_lines(1, 50)) != list(corpus_lines(0, 50))


def test_corpus_covers_code_json_and_non_ascii():
    lines = list(corpus_lines(0, 5000))
    text = "\n".join(lines)
    assert lines == list(corpus_lines(0, 5000))
    assert any(line.startswith("def ") for line in lines)
    assert sum(line.startswith("{") and json.loads(line)["id"] > 0 for line in lines) > 50
    assert {"é", "ü"} <= set(text)
    assert any("\u4e00" <= c <= "\u9fff" for c in text)  # CJK ideographs
    assert any(ord(c) >= 0x1F300 for c in text)  # emoji
    assert not any("\n" in line for line in lines)


# --- the transformers wrapper --------------------------------------------------------------


def test_wrapper_encodes_like_sentencepiece(tok, sp):
    # transformers 5 does not add the dummy prefix to text that starts with whitespace
    # (Metaspace skips it); every other text must encode exactly as SentencePiece does.
    texts = [t for t in corpus_lines(7, 2000) if t and not t[0].isspace()] + MULTILINGUAL
    mismatches = [t for t in texts if tok.encode(t, add_bos=False) != sp.encode(t)]
    assert mismatches == []
    assert tok.encode("Hi there") == [1, *sp.encode("Hi there")]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.count_tokens(text) == len(tok.encode(text)) - 1


def test_special_ids_and_sizes(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.vocab_size == 4096
    assert tok.decode([1, *tok.encode("ok", add_bos=False), 2]) == "ok"
    assert (
        tok.decode([1, *tok.encode("ok", add_bos=False), 2], skip_special_tokens=False)
        == "<s> ok</s>"
    )


def test_decode_keeps_valid_characters_of_an_invalid_byte_run(tok):
    ids = byte_ids(tok, "中") + byte_ids(tok, "中")[:1] + tok.encode(" x", add_bos=False)
    # transformers turns the whole run into four U+FFFD; only the dangling byte is lost here.
    assert tok.hf_tokenizer.decode(ids) == "\ufffd" * 4 + " x"
    assert tok.decode(ids) == "中\ufffd x"


def test_load_tokenizer_refuses_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_tokenizer(tmp_path / "nowhere")


# --- chat template -------------------------------------------------------------------------

DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "What is the capital of France?"},
]


def meta_reference_ids(sp, dialog):
    """Token ids as Meta's llama/generation.py ``chat_completion`` builds them."""
    if dialog[0]["role"] == "system":
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}, *dialog[2:]]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        turn = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += [1, *sp.encode(turn), 2]
    return ids + [1, *sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")]


def test_chat_prompt_is_the_llama2_format(tok, sp):
    assert tok.render_chat_prompt(DIALOG) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] What is the capital of France? [/INST]"
    )
    assert tok.apply_chat_template(DIALOG) == meta_reference_ids(sp, DIALOG)
    no_system = DIALOG[1:]
    assert tok.apply_chat_template(no_system) == meta_reference_ids(sp, no_system)


def test_plain_transformers_applies_the_same_template(tiny_checkpoint, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    assert hf.chat_template == FALLBACK_CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")
    assert hf.apply_chat_template(DIALOG, tokenize=False) == tok.render_chat_prompt(DIALOG)
    ids = hf.apply_chat_template(DIALOG, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tok.apply_chat_template(DIALOG)
    with pytest.raises(Exception, match="alternating"):
        hf.apply_chat_template([DIALOG[1], DIALOG[1]], tokenize=False)


def test_fallback_template_for_a_checkpoint_without_one(tiny_checkpoint, tmp_path, tok):
    # Like an early Llama 2 repository: tokenizer.model and a config without chat_template.
    shutil.copy(tiny_checkpoint / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = load_tokenizer(tmp_path)
    assert bare.hf_tokenizer.chat_template is None
    assert bare.apply_chat_template(DIALOG) == tok.apply_chat_template(DIALOG)


@pytest.mark.parametrize(
    ("roles", "param"),
    [
        (["user", "user"], "messages[1].role"),
        (["assistant", "user"], "messages[0].role"),
        (["system", "assistant"], "messages[1].role"),
        (["system", "user", "assistant", "system"], "messages[3].role"),
        (["user", "tool"], "messages[1].role"),
        (["user", "assistant"], "messages[1].role"),  # a reply needs a user turn last
        (["system"], "messages"),
        ([], "messages"),
    ],
)
def test_roles_out_of_order_are_refused(tok, roles, param):
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template([{"role": r, "content": "x"} for r in roles])
    assert info.value.param == param


def test_transcript_may_end_with_the_assistant(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert (
        tok.render_chat_prompt(messages, add_generation_prompt=False)
        == "<s>[INST] a [/INST] b </s>"
    )


# --- streaming detokenizer -----------------------------------------------------------------


def stream(detok, ids):
    deltas = [detok.add(i) for i in ids]
    return deltas + [detok.flush()]


def random_stream(tok, rng, length):
    """Pieces, byte-spelled characters (valid UTF-8 over several tokens), stray bytes, specials."""
    ids: list[int] = []
    while len(ids) < length:
        kind = rng.random()
        if kind < 0.55:
            ids.append(rng.randrange(259, tok.vocab_size))
        elif kind < 0.85:
            ids += byte_ids(tok, rng.choice("é中🦙жꙮ€\n ") + chr(rng.randrange(0x80, 0x2FFF)))
        elif kind < 0.97:
            ids.append(rng.randrange(3, 259))
        else:
            ids.append(rng.randrange(3))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_deltas_add_up_to_the_full_decode(tok, skip_special_tokens):
    rng = random.Random(1234)
    for _ in range(300):
        ids = random_stream(tok, rng, rng.randrange(1, 160))
        detok = IncrementalDetokenizer(tok, [1, 415, 416], skip_special_tokens=skip_special_tokens)
        deltas = stream(detok, ids)
        full = tok.decode(ids, skip_special_tokens)
        assert "".join(deltas) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), ids


def test_plain_pieces_stream_the_same_deltas_as_decoding_them(tok):
    class Decoding:  # the same tokenizer without the table of plain pieces
        def __init__(self, inner):
            self.inner = inner
            self.stream_anchor = inner.stream_anchor

        def decode(self, ids, skip_special_tokens=True):
            return self.inner.decode(ids, skip_special_tokens)

    table = tok.plain_piece_texts
    assert table and len(table) > tok.vocab_size // 2  # Llama 2's decoder: most tokens
    rng = random.Random(77)
    for _ in range(200):
        ids = random_stream(tok, rng, rng.randrange(1, 120))
        for continuation in (False, True):
            fast = IncrementalDetokenizer(tok, [1, 415, 416], continuation=continuation)
            slow = IncrementalDetokenizer(Decoding(tok), [1, 415, 416], continuation=continuation)
            assert [fast.add(i) for i in ids] + [fast.flush()] == [slow.add(i) for i in ids] + [slow.flush()]


def test_streaming_matches_transformers_when_bytes_are_valid(tok):
    rng = random.Random(99)
    for _ in range(100):
        chunks = [[i] for i in random_stream(tok, rng, 80) if i >= 259 or i < 3]
        for char in rng.sample("é中🦙жꙮ", 3):
            chunks.insert(rng.randrange(len(chunks) + 1), byte_ids(tok, char))
        ids = [i for chunk in chunks for i in chunk]
        assert tok.decode(ids) == tok.hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(stream(IncrementalDetokenizer(tok, []), ids)) == tok.decode(ids)


def test_multibyte_character_is_released_once_complete(tok):
    detok = IncrementalDetokenizer(tok, tok.encode("Say"))
    word = tok.encode(" hi", add_bos=False)
    assert "".join(detok.add(i) for i in word) == "hi"  # first output piece: no leading space
    assert [detok.add(i) for i in byte_ids(tok, "🦙")] == ["", "", "", "🦙"]
    assert "".join(detok.add(i) for i in tok.encode(" there", add_bos=False)) == " there"
    assert detok.flush() == ""


def test_unfinished_character_comes_out_on_flush(tok):
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add(i) for i in byte_ids(tok, "中")[:2]] == ["", ""]
    assert detok.flush() == "\ufffd"


def test_continuation_keeps_the_leading_space(tok):
    prompt = tok.encode("The capital of France is")
    output = tok.encode(" Paris, of course", add_bos=False)
    deltas = stream(IncrementalDetokenizer(tok, prompt, continuation=True), output)
    full = tok.decode(prompt + output)
    assert "".join(deltas) == full[len(tok.decode(prompt)) :] == " Paris, of course"
    assert "".join(stream(IncrementalDetokenizer(tok, prompt), output)) == "Paris, of course"


def test_streaming_decodes_a_bounded_window(tok):
    """O(1) per token: the windows decoded do not grow with the length of the output."""
    widths: list[int] = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner
            self.stream_anchor = inner.stream_anchor

        def decode(self, ids, skip_special_tokens=True):
            widths.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens)

    rng = random.Random(5)
    ids = random_stream(tok, rng, 3000)
    detok = IncrementalDetokenizer(Spy(tok), tok.encode("hello"))
    assert "".join(stream(detok, ids)) == tok.decode(ids)
    assert max(widths) < 40
    assert len(detok._ids) <= IncrementalDetokenizer.TRIM_AFTER + 40


def test_a_sessions_next_prompt_reuses_the_encoded_exchanges_and_stays_exact(tiny_checkpoint):
    import pickle

    tok = load_tokenizer(tiny_checkpoint)
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} about llamas"},
                    {"role": "assistant", "content": f"answer {i} </s> with a stop string in it"}]
    first = tok.apply_chat_template(history + [{"role": "user", "content": "and now?"}])
    before = tok._piece_ids.cache_info().hits
    second = tok.apply_chat_template(history + [{"role": "user", "content": "and then?"}])
    assert tok._piece_ids.cache_info().hits - before == 6  # the six earlier exchanges
    # the same ids as encoding the rendered text piece by piece, without the cache
    fresh = pickle.loads(pickle.dumps(tok))  # a copy starts with no cache (nothing pickled)
    assert "_piece_ids" not in fresh.__dict__
    assert fresh.apply_chat_template(history + [{"role": "user", "content": "and then?"}]) == second
    assert second != first and second[: len(first) - 12] == first[: len(first) - 12]
    assert second.count(tok.eos_token_id) == 6  # a stop string typed in a message stays text
