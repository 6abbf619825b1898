"""CLIP's byte-level BPE tokenizer in pure Python, as the Stable Diffusion text encoders use it.

text -> clean (html-unescape, NFC, collapse whitespace, lowercase) -> split into words with CLIP's pattern ->
UTF-8 bytes of each word as printable characters -> BPE merges (the last symbol of a word carries "</w>") -> ids,
then <|startoftext|> ... <|endoftext|>, truncated and padded to 77.

SDXL's two tokenizers share the vocabulary and differ only in padding: `tokenizer` (CLIP-L) pads with <|endoftext|>
(49407), `tokenizer_2` (bigG) pads with "!" (id 0), as open_clip did when bigG was trained. As in transformers, a pad
token other than <|endoftext|> is a special token: diffusers' tokenizer_2 config makes "!" one, so every "!" in a
prompt becomes id 0 too, and minigen does the same so that its images equal diffusers'. (open_clip, which bigG was
trained with, differs here: it reads a "!" inside a prompt as the ordinary token 256.) `clean_text` names two rarer
differences from transformers.

The vocabulary comes from a diffusers `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json) or from CLIP's
`bpe_simple_vocab_16e6.txt.gz` bundled in `minigen/assets/` (from open_clip_torch, MIT; see LICENSE-open_clip.txt).
"""

from __future__ import annotations

import copy
import gzip
import html
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..atomic import atomic_write

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # the text encoders' position embeddings
BUNDLED_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word ("</w>"), the first 48894 merges of the file (CLIP
# writes the count as 49152 - 256 - 2), and the two special tokens: 49408 entries.
N_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
# Matched as whole words before anything else, in this order (CLIP's pattern).
LITERALS = (BOS, EOS, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Each byte 0..255 -> a printable character, so BPE works on strings with no whitespace or control characters.

    Printable Latin-1 bytes map to themselves; the other 68 map, in byte order, to chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # Ordered as CLIP's vocabulary lists them: printable bytes first, then the rest.
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def clean_text(text: str) -> str:
    """CLIP's text cleanup, without ftfy (not a minigen dependency).

    CLIP runs `ftfy.fix_text` first; here only its Unicode NFC step is kept (transformers' CLIPTokenizer does the
    same). What that changes: mojibake is not repaired, curly quotes stay curly (so "don’t" does not split off the
    contraction "'t"), ligatures (ﬁ) and full-width forms (ＡＢ) are not folded, and control characters are kept.

    Two deliberate differences from transformers' CLIPTokenizer (and so from diffusers), both following CLIP and
    open_clip, which the encoders were trained with: html entities are unescaped (twice, as CLIP does: "&amp;" is
    "&"), and lowercasing is Python's, which writes a word-final capital sigma as "ς" (transformers writes "σ").
    """
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _char_kind(c: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, or 'P' anything else: the classes CLIP's pattern uses."""
    if c.isspace():
        return " "
    major = unicodedata.category(c)[0]
    return major if major in "LN" else "P"


def split_words(text: str) -> list[str]:
    r"""Split cleaned text as CLIP's pattern does, with unicodedata categories standing in for the `regex` module:

    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+

    The first alternative that matches at a position wins; letter and other-symbol runs are greedy, each digit is a
    word of its own, whitespace separates words and is dropped.
    """
    words, i = [], 0
    while i < len(text):
        literal = next((w for w in LITERALS if text.startswith(w, i)), None)
        if literal:
            words.append(literal)
            i += len(literal)
            continue
        kind = _char_kind(text[i])
        j = i + 1
        if kind == " ":
            i = j
            continue
        if kind != "N":
            while j < len(text) and _char_kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # (B, 77) int64: <|startoftext|>, tokens, <|endoftext|>, padding
    truncated: list[str]  # per prompt, the text cut off to fit 77 tokens ("" when it fit): for the caller to warn


class CLIPTokenizer:
    """`tokenizer(prompts)` -> TokenizedPrompts; `encode(text)` -> ids without specials; `decode(ids)` -> text."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 max_length: int = MAX_LENGTH):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the vocabulary ({len(vocab)} entries)")
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_token, self.pad_id = pad_token, vocab[pad_token]
        self.max_length = max_length
        self._cache = {BOS: [BOS], EOS: [EOS]}  # special tokens are never split

    # ---- vocabularies -------------------------------------------------------------------------------------------

    @classmethod
    def bundled(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """CLIP's vocabulary from `minigen/assets/bpe_simple_vocab_16e6.txt.gz` (the file CLIP and open_clip ship)."""
        with gzip.open(BUNDLED_VOCAB, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]  # line 0 is a version header
        symbols = list(bytes_to_unicode().values())
        tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges), BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """A diffusers/transformers tokenizer folder: vocab.json + merges.txt (diffusers' SDXL folders) or
        tokenizer.json (what transformers 5 saves), and tokenizer_config.json / special_tokens_map.json, when present,
        for the padding token and maximum length."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs.
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: it has neither vocab.json + "
                                    "merges.txt nor tokenizer.json")
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        pad = settings.get("pad_token", EOS)
        pad = pad["content"] if isinstance(pad, dict) else pad  # older files store an AddedToken dict
        max_length = min(settings.get("model_max_length", MAX_LENGTH), MAX_LENGTH)
        return cls(vocab, merges, pad_token=pad, max_length=max_length)

    def with_pad_token(self, pad_token: str) -> "CLIPTokenizer":
        """The same vocabulary (shared, not copied) padding with another token: SDXL's tokenizer_2 is `with_pad_token("!")`."""
        if pad_token not in self.vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        other = copy.copy(self)
        other.pad_token, other.pad_id = pad_token, self.vocab[pad_token]
        return other

    def save(self, folder: str | os.PathLike) -> None:
        """Write a folder transformers' CLIPTokenizer.from_pretrained and `from_folder` read (vocab.json, merges.txt,
        tokenizer_config.json, special_tokens_map.json)."""
        folder = Path(folder)
        merges = sorted(self.merge_ranks, key=self.merge_ranks.get)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        files = {
            "vocab.json": json.dumps(self.vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "special_tokens_map.json": json.dumps(special, indent=2),
            "tokenizer_config.json": json.dumps({**special, "model_max_length": self.max_length,
                                                 "tokenizer_class": "CLIPTokenizer"}, indent=2),
        }
        for name, text in files.items():
            with atomic_write(folder / name) as f:
                f.write(text.encode("utf-8"))

    # ---- encoding -----------------------------------------------------------------------------------------------

    def bpe(self, word: str) -> list[str]:
        """Merge a word's symbols, lowest-ranked pair first, until no known pair is left."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.merge_ranks.get(p, float("inf")))
            if pair not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|startoftext|>/<|endoftext|>, not truncated.

        A special pad token ("!" for tokenizer_2) is matched in the raw text first and each piece between is
        tokenized on its own, as transformers' added tokens are. Deliberate difference from open_clip (where "!" in a
        prompt is 256): diffusers' SDXL pipeline encodes prompts this way, and minigen gives the same images.
        """
        if self.pad_token in (BOS, EOS):  # already whole words of CLIP's pattern
            return self._encode_words(text)
        ids = []
        for n, piece in enumerate(text.split(self.pad_token)):
            ids.extend(([self.pad_id] if n else []) + self._encode_words(piece))
        return ids

    def _encode_words(self, text: str) -> list[int]:
        """Token ids of text with no special pad token in it: clean, split into words, BPE."""
        ids = []
        for word in split_words(clean_text(text)):
            if word not in self._cache:
                word = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab[symbol] for symbol in self.bpe(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; word ends become spaces (the original spacing and case are not recoverable)."""
        data = bytearray()
        for i in ids:
            token = self.id_to_token[int(i)]
            if token in (BOS, EOS):
                data += f" {token} ".encode()
                continue
            data += bytes(self.char_to_byte[c] for c in token.removesuffix(END_OF_WORD))
            if token.endswith(END_OF_WORD):
                data += b" "
        return " ".join(data.decode("utf-8", errors="replace").split())

    def __call__(self, prompts: str | list[str]) -> TokenizedPrompts:
        """<|startoftext|> + up to 75 tokens + <|endoftext|>, padded with this tokenizer's pad token to 77."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2
        rows, truncated = [], []
        for prompt in prompts:
            ids = self.encode(prompt)
            truncated.append(self.decode(ids[room:]))
            row = [self.bos_id, *ids[:room], self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)  # (B, 77) even for B=0
        return TokenizedPrompts(input_ids, truncated)


# The padding each text encoder was trained with: CLIP ViT-L (SD 1.x, SDXL's first) pads with <|endoftext|>, the
# OpenCLIP towers (SD 2.x's ViT-H, SDXL's bigG) with "!".
PAD_TOKENS = {"text_encoder": {"sd1": EOS, "sd2": "!", "sdxl": EOS}, "text_encoder_2": {"sdxl": "!", "sdxl-refiner": "!"}}


def model_tokenizers(family: str, root: str | os.PathLike | None = None) -> dict[str, CLIPTokenizer]:
    """{"tokenizer": ..., "tokenizer_2": ...} for the family's text encoders: from a diffusers folder's `tokenizer/`
    and `tokenizer_2/` where it has them, else the bundled vocabulary padded as the family pads."""
    bundled = CLIPTokenizer.bundled()
    tokenizers = {}
    for part, name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if family in PAD_TOKENS[part]:
            folder = Path(root) / name if root is not None else None
            tokenizers[name] = CLIPTokenizer.from_folder(folder) if folder is not None and folder.is_dir() \
                else bundled.with_pad_token(PAD_TOKENS[part][family])
    return tokenizers
