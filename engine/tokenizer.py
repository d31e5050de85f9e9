"""Tokenizer, chat template and streaming detokenizer for Llama 2 checkpoints.

``load_tokenizer`` wraps the transformers tokenizer of a local checkpoint directory (the
project's tiny checkpoint or a real Llama 2 one, unchanged) behind the few calls the engine
needs. ``IncrementalDetokenizer`` turns a stream of token ids into text deltas in O(1) per
token, never splitting a character whose UTF-8 bytes arrive as several byte-fallback tokens.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from cluster.errors import CheckpointError, InvalidRequestError
from cluster.logging_setup import get_logger

log = get_logger("engine.tokenizer")

FALLBACK_CHAT_TEMPLATE_FILE = Path(__file__).parent / "data" / "llama2_chat.jinja"
# Chat prompt pieces (one exchange between the template's BOS and EOS) whose ids are kept: a
# session's every turn, and every fit of a memory context, renders the same exchanges again.
# Pieces longer than PIECE_CACHE_MAX_CHARS are encoded each time (bounds the memory: ~40 MB).
PIECE_CACHE_SIZE = 4096
PIECE_CACHE_MAX_CHARS = 8192
CHAT_ROLES = ("system", "user", "assistant")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REPLACEMENT_CHAR = "\ufffd"
# Llama 2's decoder (tokenizer.json): the one whose output concatenates token by token.
_SENTENCEPIECE_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}


def _message_fields(message: Any, index: int) -> dict[str, str]:
    """``{"role", "content"}`` of a mapping or of an object with those attributes."""
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if role not in CHAT_ROLES:
        raise InvalidRequestError(
            f"messages[{index}].role={role!r} is not one of {', '.join(CHAT_ROLES)}",
            param=f"messages[{index}].role",
        )
    if not isinstance(content, str):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string, got {type(content).__name__}",
            param=f"messages[{index}].content",
        )
    return {"role": role, "content": content}


def validate_llama2_messages(
    messages: Sequence[Any], *, add_generation_prompt: bool
) -> list[dict[str, str]]:
    """The messages as dicts, checked against Llama 2's rules.

    Llama 2 chat wants an optional system message, then user and assistant turns
    alternating, user first; a prompt for a reply ends with a user turn.
    """
    if not messages:
        raise InvalidRequestError(
            "messages is empty; give at least one user message", param="messages"
        )
    checked = [_message_fields(m, i) for i, m in enumerate(messages)]
    first_turn = 1 if checked[0]["role"] == "system" else 0
    if first_turn == len(checked):
        raise InvalidRequestError(
            "messages has only a system message; add a user message", param="messages"
        )
    for index in range(first_turn, len(checked)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if checked[index]["role"] != expected:
            raise InvalidRequestError(
                f"messages[{index}].role={checked[index]['role']!r}, expected {expected!r}: Llama 2 "
                "chat takes an optional system message, then user and assistant alternating, user first",
                param=f"messages[{index}].role",
            )
    if add_generation_prompt and checked[-1]["role"] != "user":
        raise InvalidRequestError(
            f"messages[{len(checked) - 1}] is an assistant message; the last message of a prompt "
            "for a reply must come from the user",
            param=f"messages[{len(checked) - 1}].role",
        )
    return checked


class Tokenizer:
    """The engine's view of a Hugging Face tokenizer (build it with ``load_tokenizer``)."""

    def __init__(self, hf_tokenizer: Any, *, name: str = "") -> None:
        self._hf = hf_tokenizer
        self.name = name
        self._special_ids = frozenset(hf_tokenizer.all_special_ids)
        # Byte-fallback pieces <0x00>..<0xFF>, by id; empty for a tokenizer without them.
        self._byte_values: dict[int, int] = {
            token_id: int(match.group(1), 16)
            for token, token_id in hf_tokenizer.get_vocab().items()
            if (match := _BYTE_TOKEN.fullmatch(token))
        }
        self._byte_ids = {value: token_id for token_id, value in self._byte_values.items()}

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer (for libraries that need it, e.g. grammars)."""
        return self._hf

    @property
    def bos_token_id(self) -> int:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self._hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """None for Llama 2, which has no pad token (batching pads with any id and masks it)."""
        return self._hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @cached_property
    def chat_template(self) -> str:
        """The checkpoint's chat template, or the Llama 2 one when the checkpoint has none."""
        own = getattr(self._hf, "chat_template", None)
        if isinstance(own, str) and own.strip():
            return own
        return FALLBACK_CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")

    def encode(self, text: str, add_bos: bool = True, *, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``special_tokens``: whether special-token strings in it, such
        as ``</s>``, become those tokens (transformers' default) or stay plain text."""
        if special_tokens:
            ids = self._hf.encode(text, add_special_tokens=False)
        else:
            ids = self._plain_text_backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else list(ids)

    @cached_property
    def _plain_text_backend(self) -> Any:
        """A copy of the Rust tokenizer that never matches special tokens in text.

        transformers' ``split_special_tokens=True`` flips that switch on the shared tokenizer
        for the call (and leaves it flipped), so two threads could see each other's setting; a
        copy of its own keeps it fixed. Not pickled (the switch does not survive pickling)."""
        backend = copy.deepcopy(self._hf.backend_tokenizer)
        backend.encode_special_tokens = True
        return backend

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_plain_text_backend", None)
        state.pop("_piece_ids", None)
        return state

    @cached_property
    def _piece_ids(self) -> Any:
        """Plain-text ids of a chat prompt piece, remembered (LRU, thread-safe): a piece's ids
        never change, and most pieces of a prompt were in the previous one."""
        return lru_cache(maxsize=PIECE_CACHE_SIZE)(
            lambda piece: tuple(self.encode(piece, add_bos=False, special_tokens=False)))

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` adds to a sequence (no BOS counted)."""
        return len(self.encode(text, add_bos=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``.

        Equal to the transformers decode, except for byte-fallback runs that are not valid
        UTF-8 (random or sampled output): transformers then turns every byte of the run into
        U+FFFD, here only the invalid bytes are replaced (Python's ``errors="replace"``), so
        that a character already streamed stays in the final text.
        """
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._hf.decode(self._repair_byte_runs(ids), skip_special_tokens=skip_special_tokens)

    def _repair_byte_runs(self, ids: list[int]) -> list[int]:
        """``ids`` with each invalid UTF-8 run of byte tokens replaced by the bytes of its lossy decoding."""
        if not self._byte_values:
            return ids
        repaired: list[int] | None = None
        start = 0
        while start < len(ids):
            if ids[start] not in self._byte_values:
                if repaired is not None:
                    repaired.append(ids[start])
                start += 1
                continue
            end = start
            while end < len(ids) and ids[end] in self._byte_values:
                end += 1
            raw = bytes(self._byte_values[i] for i in ids[start:end])
            try:
                raw.decode("utf-8")
                run = ids[start:end]
            except UnicodeDecodeError:
                fixed = raw.decode("utf-8", errors="replace").encode("utf-8")
                run = [self._byte_ids[b] for b in fixed]
                if repaired is None:
                    repaired = ids[:start]
            if repaired is not None:
                repaired.extend(run)
            start = end
        return ids if repaired is None else repaired

    def render_chat_prompt(
        self, messages: Sequence[Any], add_generation_prompt: bool = True
    ) -> str:
        """The chat prompt as text, with ``<s>``/``</s>`` written out: to read it. Token ids
        come from ``apply_chat_template`` (encoding this text would turn special-token text
        inside the messages into special tokens)."""
        checked = validate_llama2_messages(messages, add_generation_prompt=add_generation_prompt)
        return self._render(checked, add_generation_prompt)

    def _render(
        self, checked: list[dict[str, str]], add_generation_prompt: bool, **variables: Any
    ) -> str:
        from jinja2 import TemplateError

        try:
            return self._hf.apply_chat_template(
                checked,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except TemplateError as exc:
            raise InvalidRequestError(
                f"messages do not fit the chat template: {exc}", param="messages"
            ) from exc

    def apply_chat_template(
        self, messages: Sequence[Any], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the chat prompt: the template's own ``<s>`` and ``</s>`` are special
        tokens, the messages' text is plain text.

        A user who types ``</s>`` or ``<s>[INST]`` in a message must not end a turn or start
        one (prompt injection): as Meta's reference does it (SentencePiece never matches
        special tokens in text), the turns between the template's BOS and EOS are encoded as
        plain text. The template is rendered with unguessable markers as ``bos_token`` and
        ``eos_token`` to tell its tokens from the messages' text.
        """
        checked = validate_llama2_messages(messages, add_generation_prompt=add_generation_prompt)
        contents = "".join(m["content"] for m in checked)
        while True:
            nonce = secrets.token_hex(8)
            if nonce not in contents:
                break
        bos, eos = f"\x00bos-{nonce}\x00", f"\x00eos-{nonce}\x00"
        text = self._render(checked, add_generation_prompt, bos_token=bos, eos_token=eos)
        if bos not in text and eos not in text:
            # A template that writes special tokens literally: transformers tells its
            # tokens from the messages' by marking the messages' ones.
            return self._hf.apply_chat_template(
                checked,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                sanitize_control_tokens=True,
                return_dict=False,
            )
        # split with str.split, not a regex: each call's markers are new, so a pattern would be
        # compiled on every prompt (re's cache never hits), which cost more than the encoding
        ids: list[int] = []
        for after_bos, between in enumerate(text.split(bos)):
            if after_bos:
                ids.append(self.bos_token_id)
            for after_eos, piece in enumerate(between.split(eos)):
                if after_eos:
                    ids.append(self.eos_token_id)
                if len(piece) > PIECE_CACHE_MAX_CHARS:
                    ids += self.encode(piece, add_bos=False, special_tokens=False)
                elif piece:
                    ids += self._piece_ids(piece)
        return ids

    @cached_property
    def stream_anchor(self) -> tuple[int, str]:
        """A plain piece (no leading space; not a byte or special token) and its text.

        Put in front of a window of tokens cut from the middle of a sequence, it makes the
        window decode as it does inside the sequence.
        """
        for piece in ("a", "x", "e", "s", "t"):
            token_id = self._hf.convert_tokens_to_ids(piece)
            if (
                isinstance(token_id, int)
                and token_id not in self._special_ids
                and token_id not in self._byte_values
            ):
                text = self.decode([token_id])
                if text and not text[0].isspace():
                    return token_id, text
        raise CheckpointError(
            f"tokenizer {self.name!r} has no single-letter piece to anchor streaming decode",
            param="checkpoint",
        )

    def prepare_streaming(self) -> None:
        """Build what streaming decode uses (the plain pieces' table) now, not on first use."""
        _ = self.plain_piece_texts

    @cached_property
    def plain_piece_texts(self) -> dict[int, str] | None:
        """The text of every token that adds exactly that text after any complete one, or None.

        For SentencePiece's decoder (``▁`` to space, byte fallback, fuse, strip the first
        space: Llama 2's) the decoding of ``ids + [t]`` is the decoding of ``ids`` followed by
        ``t``'s own text whenever ``t`` is neither special nor a byte token and ``ids`` does
        not end inside a character. ``IncrementalDetokenizer`` then streams such a token with
        a dictionary lookup instead of two decodes. None for any other decoder (each token is
        decoded in context, as before). Built once, with one batched decode of the vocabulary.
        """
        if getattr(self._hf, "clean_up_tokenization_spaces", False):
            return None  # its clean-up joins a token's text to its neighbours'
        try:
            decoder = json.loads(self._hf.backend_tokenizer.to_str()).get("decoder")
        except (AttributeError, ValueError):
            return None
        if decoder != _SENTENCEPIECE_DECODER:
            return None
        anchor_id, anchor_text = self.stream_anchor
        ids = [
            i for i in range(self.vocab_size) if i not in self._special_ids and i not in self._byte_values
        ]
        texts = self._hf.backend_tokenizer.decode_batch([[anchor_id, i] for i in ids], skip_special_tokens=True)
        table: dict[int, str] = {}
        for token_id, text in zip(ids, texts):
            piece = text[len(anchor_text) :]
            if text.startswith(anchor_text) and piece and _REPLACEMENT_CHAR not in piece:
                table[token_id] = piece
        return table

    def piece_text(self, token_id: int) -> str:
        """The vocabulary piece of ``token_id`` (``▁the``, ``<0x0A>``), for debugging and grammars."""
        return self._hf.convert_ids_to_tokens(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of the checkpoint directory ``path`` (no network access)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(
            f"tokenizer path {str(directory)!r} is not a directory; give a local checkpoint "
            "directory with tokenizer files (download remote checkpoints first)",
            param="checkpoint",
        )
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load a tokenizer from {str(directory)!r}: {exc}; the directory needs "
            "tokenizer.json or tokenizer.model with tokenizer_config.json",
            param="checkpoint",
        ) from exc
    tokenizer = Tokenizer(hf_tokenizer, name=directory.name)
    log.debug(
        "loaded tokenizer", extra={"path": str(directory), "vocab_size": tokenizer.vocab_size}
    )
    return tokenizer


class IncrementalDetokenizer:
    """Text deltas for a stream of generated token ids, O(1) work per token.

    The prefix/read offset technique of vLLM and TGI: only the last few tokens are decoded,
    and text is released when it does not end in U+FFFD, i.e. when no character is waiting
    for more of its bytes. By default the deltas add up to ``decode(output_ids)`` exactly
    (the first token's SentencePiece space is dropped, as in Meta's reference and
    transformers); with ``continuation=True`` they are the text the output adds after the
    prompt, leading space kept, as an OpenAI text completion returns it.

    With Llama 2's decoder most tokens skip the decodes: a plain piece that follows complete
    text adds its own text (``Tokenizer.plain_piece_texts``), a dictionary lookup.
    """

    # Prompt tokens kept as context in continuation mode (vLLM keeps 5 as well).
    PROMPT_CONTEXT = 5
    # Tokens before the prefix offset are dropped once this many pile up, bounding memory.
    TRIM_AFTER = 64

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        continuation: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self.PROMPT_CONTEXT :]) if continuation else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Whether ids[0] starts the decoded sequence, so that it decodes like decode(output).
        self._at_sequence_start = not continuation
        self._anchor_id, self._anchor_text = tokenizer.stream_anchor
        # Tokens whose text is known without decoding (see Tokenizer.plain_piece_texts); the
        # table holds no special token, so it applies only when those are skipped anyway.
        table = getattr(tokenizer, "plain_piece_texts", None) if skip_special_tokens else None
        self._plain: dict[int, str] = table or {}

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" while a character is pending)."""
        ids = self._ids
        piece = self._plain.get(token_id)
        if (
            piece is not None
            and self._read_offset == len(ids)  # no character is waiting for more bytes
            and (self._prefix_offset or not self._at_sequence_start)  # decoded behind the anchor
        ):
            # What the decodes below would return: the window's text followed by the piece's.
            ids.append(token_id)
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self._trim()
            return piece
        ids.append(token_id)
        prefix_text = self._text(self._prefix_offset, self._read_offset)
        new_text = self._text(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._trim()
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD) at the end of the stream."""
        prefix_text = self._text(self._prefix_offset, self._read_offset)
        new_text = self._text(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        self._trim()
        return new_text[len(prefix_text) :]

    def _text(self, start: int, end: int) -> str:
        if start == end:
            return ""
        window = self._ids[start:end]
        if start == 0 and self._at_sequence_start:
            return self._tokenizer.decode(window, self._skip_special_tokens)
        # Decoding from the middle of a sequence would drop the leading space of the first
        # piece (the decoder strips SentencePiece's dummy prefix); an anchor piece keeps it.
        text = self._tokenizer.decode([self._anchor_id, *window], self._skip_special_tokens)
        return text[len(self._anchor_text) :]

    def _trim(self) -> None:
        if self._prefix_offset >= self.TRIM_AFTER:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
            self._at_sequence_start = False
