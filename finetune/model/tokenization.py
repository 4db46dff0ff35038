"""ChatGLM3 tokenizer: the official SentencePiece model plus ChatGLM3's nine role and prompt tokens."""

import json
import os
import re

import sentencepiece as spm
from transformers.tokenization_utils_base import BatchEncoding, PaddingStrategy
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from finetune.atomic_files import write_text_atomically

# ChatGLM3's own tokens, in id order: they take the ids right after the SentencePiece vocabulary.
CHATGLM_SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
CHAT_ROLES = ("system", "user", "assistant", "observation")
# Command tokens parsed from text when `encode_special_tokens` is on (and on the chat-template path): the bracketed and
# role tokens anywhere, "sop"/"eop" only right after a mask token, so words such as "sops" stay text.
COMMAND_TOKEN_PATTERN = re.compile(
    "|".join(re.escape(token) for token in CHATGLM_SPECIAL_TOKENS if token not in ("sop", "eop"))
    + r"|(?<=MASK\])(?:sop|eop)"
)
ROLE_TOKENS = frozenset(f"<|{role}|>" for role in CHAT_ROLES)
# The official tokenizer's names for the SentencePiece control ids (unk and pad share SentencePiece's unk id).
CONTROL_COMMANDS = ("<bos>", "<eos>", "<unk>", "<pad>")
# The official chat template (tokenizer_config.json of chatglm3-6b) renders a turn as `<|role|>` + "\n " + content; the
# space stands for SentencePiece's dummy prefix. Ours also writes the metadata (tool name) and a system turn's tools,
# exactly as build_single_message/build_chat_input do.
CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop{% endif %}"
    "<|{{ message['role'] }}|>{{ message['metadata'] if message['metadata'] is defined else '' }}"
    "{{ '\\n ' + message['content'] }}"
    "{% if message['role'] == 'system' and message['tools'] is defined %}"
    "{{ '\\n' + (message['tools'] | tojson(indent=4)) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


REPLY_STOP_TOKENS = ("<|user|>", "<|observation|>")
# SentencePiece's word-start marker.
SENTENCEPIECE_SPACE = "\u2581"
# tokenizer_config.json keys the official tokenizer cannot take: its special-token names are read-only properties
# (eos/pad/unk raise "no setter"), `bos_token` would be added as a new token on the id of <|assistant|>, and
# `added_tokens_decoder` makes it decode pad/unk ids as "<unk>". Ours derives all of them from tokenizer.model.
KEYS_THE_OFFICIAL_TOKENIZER_REJECTS = ("added_tokens_decoder", "bos_token", "eos_token", "pad_token", "unk_token")


def reply_stop_ids(tokenizer) -> list[int]:
    """Ids that end a generated reply: eos, and the role tokens that start the next turn (<|user|>, <|observation|>)."""
    return [tokenizer.eos_token_id, *(tokenizer.get_command(token) for token in REPLY_STOP_TOKENS)]


class ChatGLMTokenizer(SentencePieceBackend):
    """Tokenizer of chatglm3-6b checkpoints: reads their `tokenizer.model` and `tokenizer_config.json`.

    As the official tokenizer: text is encoded with SentencePiece only, so the literal text "<|user|>" stays text,
    unless `encode_special_tokens` is on (then the nine command tokens, never `<s>`/`</s>`/`<unk>`, are parsed);
    `apply_chat_template` always parses the command tokens its template writes. `encode` prefixes `[gMASK] sop`.
    Padding is on the left by default and returns `position_ids` (counting real tokens, 0 on padding).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file: str, remove_space: bool = False, do_lower_case: bool = False, **kwargs):
        # SentencePiece's own dummy-prefix handling is the official behaviour ("legacy" in transformers' terms).
        kwargs.pop("legacy", None)
        # The official option `encode_special_tokens=True` means: parse special tokens written in the text.
        if "encode_special_tokens" in kwargs:
            kwargs["split_special_tokens"] = not kwargs.pop("encode_special_tokens")
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        if not kwargs.get("chat_template"):
            kwargs["chat_template"] = CHATGLM3_CHAT_TEMPLATE
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case

        sentencepiece_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
        kwargs.setdefault("unk_token", sentencepiece_model.id_to_piece(sentencepiece_model.unk_id()))
        kwargs.setdefault("bos_token", sentencepiece_model.id_to_piece(sentencepiece_model.bos_id()))
        kwargs.setdefault("eos_token", sentencepiece_model.id_to_piece(sentencepiece_model.eos_id()))
        kwargs.setdefault("pad_token", kwargs["unk_token"])
        kwargs.setdefault("extra_special_tokens", list(CHATGLM_SPECIAL_TOKENS))
        super().__init__(
            vocab_file=vocab_file, remove_space=remove_space, do_lower_case=do_lower_case, legacy=True, **kwargs
        )
        self._check_special_token_ids()

    def _check_special_token_ids(self) -> None:
        """Fail when a ChatGLM3 token does not have its official id (SentencePiece size + position)."""
        base = self.sp_model.get_piece_size()
        for offset, token in enumerate(CHATGLM_SPECIAL_TOKENS):
            token_id = self._added_tokens_encoder.get(token)
            if token_id != base + offset:
                raise ValueError(
                    f"{self.vocab_file}: special token {token!r} has id {token_id}, expected {base + offset} "
                    f"(SentencePiece size {base} + {offset}); the tokenizer_config.json `added_tokens_decoder` "
                    "does not match this tokenizer.model - delete that field or re-save the tokenizer."
                )

    @property
    def encode_special_tokens(self) -> bool:
        """The official option: parse the ChatGLM3 command tokens written in the text (default False)."""
        return not self.split_special_tokens

    @encode_special_tokens.setter
    def encode_special_tokens(self, value: bool) -> None:
        self.split_special_tokens = not value

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the nine ChatGLM3 tokens (65024 for chatglm3-6b)."""
        return self.sp_model.get_piece_size() + len(CHATGLM_SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        """Map every piece and added token to its id."""
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.sp_model.get_piece_size())}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a command token: "[gMASK]", "sop", "<|assistant|>"... or the official "<bos>", "<eos>", "<pad>"."""
        if token in CONTROL_COMMANDS:
            control_ids = {"<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id()}
            return control_ids.get(token, self.sp_model.unk_id())
        if token not in CHATGLM_SPECIAL_TOKENS:
            raise KeyError(
                f"{token!r} is not a ChatGLM3 command token; expected one of {CHATGLM_SPECIAL_TOKENS + CONTROL_COMMANDS}"
            )
        return self._added_tokens_encoder[token]

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of `text`; with `split_special_tokens=False` (encode_special_tokens) command tokens are parsed.

        When command tokens are parsed, the text after a role token is encoded as `build_single_message` does: its
        first line (the metadata) with the newline, then the rest, whose one leading space (the chat template's
        stand-in for SentencePiece's dummy prefix) is dropped, so templates give exactly `build_chat_input`'s ids.
        """
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split_special_tokens:
            return self.sp_model.encode(text, out_type=str)
        pieces: list[str] = []
        previous_command = None
        position = 0
        for match in COMMAND_TOKEN_PATTERN.finditer(text):
            pieces += self._encode_segment(text[position : match.start()], previous_command)
            pieces.append(match.group())
            previous_command = match.group()
            position = match.end()
        pieces += self._encode_segment(text[position:], previous_command)
        return pieces

    def _encode_segment(self, segment: str, previous_command: str | None) -> list[str]:
        """Pieces of the text between command tokens (after a role token: metadata line, then content)."""
        if not segment:
            return []
        if previous_command in ROLE_TOKENS and "\n" in segment:
            metadata, content = segment.split("\n", 1)
            content = content.removeprefix(" ")
            return self.sp_model.encode(metadata + "\n", out_type=str) + self.sp_model.encode(content, out_type=str)
        return self.sp_model.encode(segment, out_type=str)

    def apply_chat_template(
        self, conversation: list[dict] | list[list[dict]], *args, tokenizer_kwargs: dict | None = None, **kwargs
    ) -> str | list[int] | list[list[int]] | BatchEncoding:
        """transformers' apply_chat_template, with the command tokens the template writes parsed as tokens."""
        tokenizer_kwargs = {"split_special_tokens": False, **(tokenizer_kwargs or {})}
        return super().apply_chat_template(conversation, *args, tokenizer_kwargs=tokenizer_kwargs, **kwargs)

    def prepare_for_tokenization(self, text: str, is_split_into_words: bool = False, **kwargs) -> tuple[str, dict]:
        """Apply the `do_lower_case` and `remove_space` options of tokenizer_config.json to the text."""
        if self.do_lower_case:
            text = text.lower()
        if self.remove_space:
            text = " ".join(text.strip().split())
        return text, kwargs

    def _convert_id_to_token(self, index: int) -> str:
        """Token of an id: as the official tokenizer, "" for bos, eos, pad/unk, negative ids (-100) and ids past the
        vocabulary (the embedding's padding rows, which an untrained model may sample)."""
        silent = (self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id())
        if index in self._added_tokens_decoder and index not in silent:
            return self._added_tokens_decoder[index].content
        if index in silent or index < 0 or index >= self.sp_model.get_piece_size():
            return ""
        return self.sp_model.id_to_piece(index)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        """Text of ids as the official decode: command tokens are written out even with skip_special_tokens.

        The official tokenizer's special ids (bos, eos, pad/unk) and -100 decode to nothing either way, so
        `skip_special_tokens` changes nothing visible; use `strip_command_ids` to drop the command tokens.
        """
        return self.decode_ids([token_ids] if isinstance(token_ids, int) else list(token_ids))

    def decode_ids(self, ids: list[int]) -> str:
        """Text of `ids` as decode() gives it, about six times faster than id -> token -> text (the API server decodes
        every token of every stream): runs of SentencePiece ids go straight to SentencePiece, the ids
        `_convert_id_to_token` silences are skipped and the others become their tokens' text."""
        piece_count = self.sp_model.get_piece_size()
        silent = (self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id())
        parts: list[str] = []
        run: list[int] = []
        for index in ids:
            if 0 <= index < piece_count and index not in silent and index not in self._added_tokens_decoder:
                run.append(index)
                continue
            token = self._convert_id_to_token(index)
            if token in self._added_tokens_encoder:
                if run:
                    parts.append(self._decode_run(run, after_command=bool(parts)))
                    run = []
                parts.append(token)
            elif token:
                run.append(self.sp_model.piece_to_id(token))
        if run:
            parts.append(self._decode_run(run, after_command=bool(parts)))
        return "".join(parts)

    def _decode_run(self, run: list[int] | list[str], after_command: bool) -> str:
        """Text of a run of SentencePiece ids or pieces. SentencePiece drops the word-start space of the text's first
        piece; after a command token the official decoder (one SentencePiece call over all pieces) keeps it."""
        first_piece = run[0] if isinstance(run[0], str) else self.sp_model.id_to_piece(run[0])
        text = self.sp_model.decode(run)
        if after_command and first_piece.startswith(SENTENCEPIECE_SPACE) and not text.startswith(" "):
            return " " + text
        return text

    def strip_command_ids(self, ids: list[int]) -> list[int]:
        """`ids` without the nine ChatGLM3 command tokens (for text-only decoding, e.g. metrics)."""
        first_command = self.sp_model.get_piece_size()
        return [token for token in ids if not first_command <= token < first_command + len(CHATGLM_SPECIAL_TOKENS)]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join tokens into text: runs of pieces are SentencePiece-decoded, added tokens are kept as written."""
        parts: list[str] = []
        pieces: list[str] = []
        for token in tokens:
            if not token:
                continue
            if token in self._added_tokens_encoder:
                if pieces:
                    parts.append(self._decode_run(pieces, after_command=bool(parts)))
                    pieces = []
                parts.append(token)
            else:
                pieces.append(token)
        if pieces:
            parts.append(self._decode_run(pieces, after_command=bool(parts)))
        return "".join(parts)

    def _pad(
        self,
        encoded_inputs: dict,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """transformers' padding, plus the official `position_ids`: 0, 1, ... over the tokens, 0 on padding."""
        length = len(encoded_inputs[self.model_input_names[0]])
        positions = list(encoded_inputs.get("position_ids") or range(length))
        padded = super()._pad(
            encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side, return_attention_mask
        )
        if "position_ids" in self.model_input_names:
            padding = [0] * (len(padded[self.model_input_names[0]]) - length)
            side = padding_side if padding_side is not None else self.padding_side
            padded["position_ids"] = padding + positions if side == "left" else positions + padding
        return padded

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Prefix `[gMASK] sop`; a second sequence is appended and closed with eos."""
        prefix = [self.get_command("[gMASK]"), self.get_command("sop")]
        if token_ids_1 is None:
            return prefix + token_ids_0
        return prefix + token_ids_0 + token_ids_1 + [self.eos_token_id]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 for the tokens `build_inputs_with_special_tokens` adds, 0 for text tokens."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        if token_ids_1 is None:
            return [1, 1] + [0] * len(token_ids_0)
        return [1, 1] + [0] * (len(token_ids_0) + len(token_ids_1)) + [1]

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """Ids of one chat turn: the role token, then `metadata` and a newline, then the message text."""
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {CHAT_ROLES}")
        role_id = self.get_command(f"<|{role}|>")
        return [role_id] + self.sp_model.encode(f"{metadata}\n") + self.sp_model.encode(message)

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user") -> BatchEncoding:
        """Prompt tensors for the next assistant turn: `[gMASK] sop`, the history, the query, `<|assistant|>`."""
        input_ids = [self.get_command("[gMASK]"), self.get_command("sop")]
        for turn in history or []:
            content = turn["content"]
            if turn["role"] == "system" and "tools" in turn:
                content = content + "\n" + json.dumps(turn["tools"], indent=4, ensure_ascii=False)
            input_ids += self.build_single_message(turn["role"], turn.get("metadata", ""), content)
        input_ids += self.build_single_message(role, "", query)
        input_ids.append(self.get_command("<|assistant|>"))
        return BatchEncoding({"input_ids": [input_ids], "attention_mask": [[1] * len(input_ids)]}, tensor_type="pt")

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> tuple[str, ...]:
        """transformers' save_pretrained; the chat template goes into tokenizer_config.json, as in official folders,
        and the keys the official tokenizer cannot load are left out (see KEYS_THE_OFFICIAL_TOKENIZER_REJECTS)."""
        kwargs.setdefault("save_jinja_files", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike,
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        """Write the vocabulary, then rewrite tokenizer_config.json (`file_names[0]`) without the rejected keys."""
        saved = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        config_path = file_names[0]
        with open(config_path, encoding="utf-8") as handle:
            values = json.load(handle)
        for key in KEYS_THE_OFFICIAL_TOKENIZER_REJECTS:
            values.pop(key, None)
        write_text_atomically(config_path, json.dumps(values, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return saved

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the SentencePiece model to `save_directory` atomically (temp file + rename)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name)
        temporary = f"{target}.tmp-{os.getpid()}"
        with open(temporary, "wb") as handle:
            handle.write(self.sp_model.serialized_model_proto())
        os.replace(temporary, target)
        return (target,)
