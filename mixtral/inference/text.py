"""Incremental text of one generated sequence: detokenized as tokens arrive, cut at stop strings.

Shared by `generate`/`stream` and the serving engine. Text is released only when it is certain:
never a partial UTF-8 character (SentencePiece's byte-fallback pieces can split one; the
`StreamDecoder` holds it back), never a tail that could still grow into a stop string, and never
any of a stop string itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from mixtral.text.tokenizer import StreamDecoder, Tokenizer


class TextRow:
    """Incremental text of one row: decodes tokens, finds stop strings, holds back a possible stop prefix."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], context: Sequence[int] = ()) -> None:
        # The prompt as context: text continues the prompt and keeps a leading space.
        self.decoder = StreamDecoder(tokenizer, context=context)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.ids: list[int] = []
        self.finish_reason = "length"

    def push(self, token: int, eos_id: int | None) -> bool:
        """Add a token; True when the row is finished by EOS or a stop string."""
        self.ids.append(token)
        if token == eos_id:
            self.finish_reason = "eos"
            return True
        self.text += self.decoder.push(token)
        window = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, window)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            return True
        return False

    def take(self, final: bool) -> str:
        """Text that is safe to show now (everything, when final)."""
        if final and self.finish_reason == "length":
            self.text += self.decoder.flush()
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a tail that could still grow into a stop string
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        piece, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return piece
