"""minigen's pure-Python CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary."""

import random

import pytest
import transformers

from minigen.sd.tokenizer import (BUNDLED_VOCAB, EOS, CLIPTokenizer, clean_text, model_tokenizers, split_words)

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "A  Photo\tof\n\nan   ASTRONAUT  ",
    "Don't stop, it's what they'd've wanted; we'll see, I'm sure you're right",
    "rock 'n' roll, ''quoted'' 's alone",
    "café, naïve, Zoë, crème brûlée, São Paulo, Øresund, Straße",
    "cafe\u0301 (decomposed accent, NFC makes it é)",
    "東京の夜景, 北京烤鸭, 서울 야경, Москва зимой, Αθήνα οδός, مرحبا بالعالم, नमस्ते दुनिया",
    "😀 🎉🎉 👩‍🚀 👍🏽 🇯🇵 ❤️ a cat 🐱 in space",
    "!!! ??? ... --- *** ### @user #hashtag $100 50% a&b a/b (x) [y] {z} <tag> ~ ` ^ | \\ =",
    "3.14159 1,024x1024 2024-01-01 007 x² ½ Ⅻ ⅷ 10:30pm",
    "masterpiece, best quality, (detailed face:1.2), [bad hands], <lora:style:0.8>",
    "https://example.com/path?q=1&r=2 and user@mail.org",
    "ﬁne ligature, ＦＵＬＬＷＩＤＴＨ, ＡＢＣ１２３",
    "a <|endoftext|> b <|startoftext|> c",
    "İstanbul ΣΊΣΥΦΟΣa ΟΔΟΣx",  # capital sigma inside words only: word-final ones differ, see below
    "word " * 100,  # 100 words: truncated to 75
    "an extremely long prompt with punctuation, commas, and many, many descriptive words " * 8,
]


def random_prompts(n: int = 150, seed: int = 0) -> list[str]:
    """Random strings over letters, digits, punctuation, accents, CJK, emoji and whitespace: splitting edge cases."""
    pool = (list("abcXYZ019 '!?.,-_()&;<>|\"") + list("éÉñüßøłğ") + ["e\u0301", "\u00a0", "\t", "\n", "''", "'s", "'ll"]
            + list("東京日本") + ["😀", "👩‍🚀", "🇯🇵", "❤️"] + list("²½Ⅻ٣") + list("дЖΩλ") + ["्", "ा"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def ours():
    return tuple(model_tokenizers("sdxl").values())  # bundled vocabulary: (tokenizer, tokenizer_2)


@pytest.fixture(scope="module")
def reference(ours, tmp_path_factory):
    """transformers' CLIPTokenizer read from folders our `save` writes: SDXL's tokenizer (pad <|endoftext|>)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    ours[0].save(folder)
    return transformers.CLIPTokenizer.from_pretrained(folder)


def hf_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_reference_ids_from_design_notes(ours):
    ids = ours[0]("a photo of an astronaut riding a horse on mars").input_ids[0].tolist()
    assert ids[:12] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert ids[12:] == [49407] * 65


@pytest.mark.parametrize("prompt", PROMPTS + random_prompts())
def test_matches_transformers(ours, reference, prompt):
    assert ours[0](prompt).input_ids[0].tolist() == hf_ids(reference, prompt)


@pytest.fixture(scope="module")
def reference_2(ours, tmp_path_factory):
    """transformers' CLIPTokenizer with SDXL's tokenizer_2 config: pad_token "!", which makes "!" a special token."""
    folder = tmp_path_factory.mktemp("tokenizer_2")
    ours[1].save(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ref.pad_token == "!" and ref.pad_token_id == 0
    return ref


@pytest.mark.parametrize("prompt", PROMPTS + random_prompts(seed=1) + ["wow!", "hello!! x!'s !a! !!", "a ! b"])
def test_tokenizer_2_matches_transformers_with_sdxl_pad_token(ours, reference_2, prompt):
    """tokenizer_2 pads with "!" (id 0) and, as transformers (and so diffusers) does, turns every "!" in a prompt
    into id 0 too. open_clip, which bigG was trained with, would read a "!" in a prompt as token 256; minigen
    follows diffusers so that its images equal diffusers'."""
    assert ours[1](prompt).input_ids[0].tolist() == hf_ids(reference_2, prompt)


def test_tokenizer_2_exclamation_mark_is_the_pad_id(ours):
    assert ours[1]("wow!").input_ids[0, :4].tolist() == [49406, 2781, 0, 49407]
    assert ours[0]("wow!").input_ids[0, :4].tolist() == [49406, 2781, 256, 49407]  # tokenizer 1: an ordinary token


def test_truncation_is_reported_with_the_text_cut_off(ours, reference):
    long_prompt = " ".join(f"word{i}" for i in range(60))  # "wordN" is 2+ tokens each: well over 75
    out = ours[0]([long_prompt, "short prompt"])
    full = ours[0].encode(long_prompt)
    assert len(full) > 75
    assert out.input_ids.shape == (2, 77)
    assert out.input_ids[0, -1].item() == 49407 and out.input_ids[0, 1:76].tolist() == full[:75]
    # What diffusers prints when it warns: the tokens past the 75 that fit, decoded.
    assert out.truncated[0] == reference.decode(full[75:]) != ""
    assert out.truncated[1] == ""
    assert ours[0]([]).input_ids.shape == (0, 77)


def test_deliberate_differences_from_transformers_follow_clip(ours, reference):
    # CLIP's basic_clean unescapes twice; transformers' CLIPTokenizer does not (see clean_text).
    assert reference("salt &amp; pepper").input_ids != reference("salt & pepper").input_ids
    assert ours[0].encode("salt &amp; pepper") == ours[0].encode("salt & pepper")
    assert ours[0].encode("a &amp;amp; b") == ours[0].encode("a & b")
    assert clean_text("  Hello\u00a0 WORLD\n") == "hello world"
    # Python's lower() (CLIP's) writes a word-final capital sigma as final sigma; transformers' does not.
    assert clean_text("ΟΔΟΣ") == "οδος" and reference.backend_tokenizer.normalizer.normalize_str("ΟΔΟΣ") == "οδοσ"


def test_split_words_follows_clip_pattern():
    assert split_words("don't ''s x²1 hello!! <|endoftext|>") == [
        "don", "'t", "''", "s", "x", "²", "1", "hello", "!!", "<|endoftext|>"]


def test_folder_round_trip_and_transformers_written_folder(ours, reference, tmp_path):
    reference.save_pretrained(tmp_path / "hf")  # the layout a diffusers `tokenizer/` folder has
    from_hf = CLIPTokenizer.from_folder(tmp_path / "hf")
    assert from_hf.vocab == ours[0].vocab and from_hf.merge_ranks == ours[0].merge_ranks
    assert from_hf.pad_id == 49407 and from_hf.max_length == 77
    ours[1].save(tmp_path / "two")
    assert CLIPTokenizer.from_folder(tmp_path / "two").pad_id == 0
    (tmp_path / "root").mkdir()
    ours[0].save(tmp_path / "root" / "tokenizer")
    ours[1].save(tmp_path / "root" / "tokenizer_2")
    first, second = model_tokenizers("sdxl", tmp_path / "root").values()
    assert (first.pad_id, second.pad_id) == (49407, 0)


def test_bad_inputs(ours, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        (tmp_path / "vocab.json").write_text("{}")
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad token '<pad>' is not in the vocabulary"):
        ours[0].with_pad_token("<pad>")
    with pytest.raises(ValueError, match="is not in the vocabulary"):
        CLIPTokenizer({"a": 0}, [])


def test_bundled_vocabulary_and_licence_are_shipped():
    assert BUNDLED_VOCAB.is_file()
    licence = (BUNDLED_VOCAB.parent / "LICENSE-open_clip.txt").read_text()
    assert "Permission is hereby granted, free of charge" in licence
    assert EOS in CLIPTokenizer.bundled().vocab
