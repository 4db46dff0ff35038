"""ChatGLM3 tokenizer: the official SentencePiece model plus ChatGLM3's nine role and prompt tokens."""

import json
import os

import sentencepiece as spm
from transformers.tokenization_utils_base import BatchEncoding
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

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


class ChatGLMTokenizer(SentencePieceBackend):
    """Tokenizer of chatglm3-6b checkpoints: reads their `tokenizer.model` and `tokenizer_config.json`.

    Text is encoded with SentencePiece only; the literal text "<|user|>" stays text (role tokens come from
    `build_single_message`/`build_chat_input`, never from user content). `encode` prefixes `[gMASK] sop`.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, remove_space: bool = False, do_lower_case: bool = False, **kwargs):
        # The official config names its remote class in `auto_map`; this class replaces it, so never save it back.
        kwargs.pop("auto_map", None)
        # SentencePiece's own dummy-prefix handling is the official behaviour ("legacy" in transformers' terms).
        kwargs.pop("legacy", None)
        # The official option `encode_special_tokens=True` means: parse special tokens written in the text.
        if "encode_special_tokens" in kwargs:
            kwargs["split_special_tokens"] = not kwargs.pop("encode_special_tokens")
        kwargs.setdefault("split_special_tokens", True)
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
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the nine ChatGLM3 tokens (65024 for chatglm3-6b)."""
        return self.sp_model.get_piece_size() + len(CHATGLM_SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        """Map every piece and added token to its id."""
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.sp_model.get_piece_size())}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a ChatGLM3 command token such as "[gMASK]", "sop" or "<|assistant|>"."""
        if token not in CHATGLM_SPECIAL_TOKENS:
            raise KeyError(f"{token!r} is not a ChatGLM3 command token; expected one of {CHATGLM_SPECIAL_TOKENS}")
        return self._added_tokens_encoder[token]

    def prepare_for_tokenization(self, text: str, is_split_into_words: bool = False, **kwargs) -> tuple[str, dict]:
        """Apply the `do_lower_case` and `remove_space` options of tokenizer_config.json to the text."""
        if self.do_lower_case:
            text = text.lower()
        if self.remove_space:
            text = " ".join(text.strip().split())
        return text, kwargs

    def _convert_id_to_token(self, index: int) -> str:
        """Piece of a SentencePiece id; the unknown token for ids outside the vocabulary."""
        if 0 <= index < self.sp_model.get_piece_size():
            return self.sp_model.id_to_piece(index)
        return str(self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join tokens into text: runs of pieces are SentencePiece-decoded, added tokens are kept as written."""
        parts: list[str] = []
        pieces: list[str] = []
        for token in tokens:
            if token in self._added_tokens_encoder:
                if pieces:
                    parts.append(self.sp_model.decode_pieces(pieces))
                    pieces = []
                parts.append(token)
            else:
                pieces.append(token)
        if pieces:
            parts.append(self.sp_model.decode_pieces(pieces))
        return "".join(parts)

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

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the SentencePiece model to `save_directory` atomically (temp file + rename)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name)
        temporary = f"{target}.tmp-{os.getpid()}"
        with open(temporary, "wb") as handle:
            handle.write(self.sp_model.serialized_model_proto())
        os.replace(temporary, target)
        return (target,)
