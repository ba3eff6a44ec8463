"""Text: the Mixtral tokenizer (SentencePiece or tokenizers backend, streaming detokenizer) and the
Mixtral-Instruct chat format."""

from mixtral.text.chat import encode_chat, encode_chat_with_mask, format_chat_text, validate_chat
from mixtral.text.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, save_tokenizer

__all__ = [
    "StreamDecoder",
    "Tokenizer",
    "encode_chat",
    "encode_chat_with_mask",
    "format_chat_text",
    "load_tokenizer",
    "save_tokenizer",
    "validate_chat",
]
