"""CLIPTokenizer: id-for-id parity with open_clip's SimpleTokenizer (the oracle), the ASCII fast-path claim,
the heap merge, decoding, and the errors for input that is not text. Tolerance: none (ids must be identical)."""

import html
import random
import subprocess
import sys

import pytest

from clipdiffusion.errors import PromptError
from clipdiffusion.text import tokenizer as tk
from clipdiffusion.text.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, CLIPTokenizer
from refs import open_clip_module

TAGS = [
    "masterpiece", "best quality", "1girl", "solo", "long hair", "looking at viewer", "smile", "outdoors",
    "cyberpunk city", "neon lights", "photorealistic", "8k uhd", "dslr", "soft lighting", "film grain",
    "highly detailed", "trending on artstation", "by greg rutkowski", "octane render", "bokeh", "a red cube",
    "don't", "it's", "WE'LL", "you're", "I'm", "they've", "she'd", "rock'n'roll", "o'clock",
]
WEIGHTED = ["(red hair:1.2)", "((blue eyes))", "[blurry]", "(worst quality:1.4)", "\\(escaped\\)", "(a: 0.8 )",
            "[[cat]]", "BREAK", "(x:abc)", "cat:1.2)"]
UNICODE = [
    'café', 'naïve', 'Ångström', 'jalapeño', 'Straße', 'İstanbul', 'ﬁne ﬂower', '日本語の猫', '一只可爱的猫', '고양이',
    'кошка на крыше', 'القطة', 'बिल्ली', 'แมว', '😀', '🐱\u200d👤', '👨\u200d👩\u200d👧', '❤️', '✨sparkles✨',
    'ｆｕｌｌ ｗｉｄｔｈ', 'ＡＢＣ１２３', '“curly” ‘quotes’', 'em—dash…', 'é', 'Z̤͔ͧ̑̓a͖̞lgo', '½ ² ⅷ', '١٢٣ digits',
    '€100 ¥200 £3', '©®™', '\u200bzero\u200dwidth', '\xa0nbsp\xa0', '\u3000ideographic', '\u2028line\u2029sep',
    '\ufeffbom', 'ǅ titlecase', 'ΣΑΣ σας', 'ⅰⅱⅲ', 'x̀́̂',
]
MOJIBAKE = ["cafÃ©", "naÃ¯ve", "Ã¼ber", "â€œquotedâ€\x9d", "donâ€™t", "â€”", "Ã\xa0 la", "ðŸ˜€"]
HTML = ["&amp;", "&#39;", "&lt;b&gt;bold&lt;/b&gt;", "AT&T", "R&D", "&amp;amp;amp;", "&nbsp;x", "&#x27;hex",
        "&copy 2024", "<b>&amp;lt;</b>", "&unknown;", "&#9731;", "& ;", "&#0;", "&#xD800;"]
ODD = ["a\tb", "a\nb\r\nc", "  leading", "trailing  ", "a\x0bb", "a\x0cb", "a\x1fb", "a\x00b", "a\x7fb",
       "\x85next", "\x1b[31mred\x1b[0m", "tab\t\t\ttab", "\x9d", "\x80\x81"]
SPECIAL = ["<end_of_text>", "<start_of_text>", "<|endoftext|>", "<|startoftext|>", "a<end_of_text>b",
           "<END_OF_TEXT>", "</w>", "<w>"]
PUNCT = ["!!!", "?!?!", "...", ",,,,", "--", "~~~", "@#$%^&*", "(((", ")))", "[[[", "a,b,c", "1.5", "3.14159",
         "1,000,000", "2024-01-01", "#hashtag", "@user", "e-mail", "snake_case_name", "http://x.y/z?q=1"]


def _prompts(n=420, seed=1234):
    rng = random.Random(seed)
    pools = [TAGS, WEIGHTED, UNICODE, MOJIBAKE, HTML, ODD, SPECIAL, PUNCT]
    seps = [", ", " ", ",", " , ", "\t", "\n", "  ", "|", ". "]
    out = [p for pool in pools for p in pool]
    while len(out) < n:
        k = rng.randint(1, 14)
        parts = [rng.choice(rng.choice(pools)) for _ in range(k)]
        text = rng.choice(seps).join(parts)
        if rng.random() < 0.2:
            text = text.upper()
        if rng.random() < 0.1:
            text += " " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(30, 120)))
        if rng.random() < 0.1:
            text += " " + str(rng.randint(0, 10**12))
        out.append(text)
    out += ["", " ", "a", "A", "x" * 300, "ab" * 150, "supercalifragilisticexpialidocious" * 4, "9" * 80]
    return out


def openai_simple_tokenizer():
    """open_clip's SimpleTokenizer with OpenAI's original special-token spelling, i.e. openai/CLIP's
    ``simple_tokenizer.py``: open_clip 3.x only renamed ``<|startoftext|>``/``<|endoftext|>`` to
    ``<start_of_text>``/``<end_of_text>`` (same ids 49406/49407, same regex around them)."""
    import regex

    ref = open_clip_module("tokenizer").SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    for old, new in renamed.items():
        ref.encoder[new] = ref.encoder.pop(old)
        ref.decoder[ref.encoder[new]] = new
        ref.cache.pop(old, None)
        ref.cache[new] = new
    ref.pat = regex.compile(
        regex.escape("<|startoftext|>") + "|" + regex.escape("<|endoftext|>") + "|" + ref.pat.pattern.split("|", 2)[2],
        regex.IGNORECASE,
    )
    return ref


@pytest.fixture(scope="module")
def ref():
    return openai_simple_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_parity_with_open_clip_on_varied_prompts(tok, ref):
    prompts = _prompts()
    assert len(prompts) >= 400
    mismatches = [(p, tok.encode(p), ref.encode(p)) for p in prompts if tok.encode(p) != ref.encode(p)]
    assert not mismatches, mismatches[:3]


def test_encode_words_concatenates_to_encode(tok):
    for p in _prompts():
        words = tok.encode_words(p)
        assert [i for _, ids in words for i in ids] == tok.encode(p), repr(p)
        assert all(w and not any(c.isspace() for c in w) for w, _ in words)
    assert tok.encode_words("Tag21, x  &amp; \u03a3\u0391\u03a3 cafe\u0301") == [
        ("Tag21,", [3640, 273, 272, 267]), ("x", [343]), ("&", [261]),
        ("\u03a3\u0391\u03a3", tok.encode("\u03c3\u03b1\u03c2")),  # final sigma, as in the whole-text lowercasing
        ("caf\u00e9", tok.encode("caf\u00e9")),
    ]


def test_parity_on_random_ascii_including_entities_and_controls(tok, ref):
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + ["&amp;", "&#39;", "&lt;", "<", "'s", "'ll"] * 8
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_fast_path_text_is_a_fixed_point_of_the_reference_cleaning():
    """The claim the fast path rests on: ASCII without '&' and without control characters other than tab,
    newline and CR is unchanged by ftfy.fix_text and html.unescape, up to ftfy's CR/CRLF -> LF, which the
    whitespace collapse that follows erases."""
    import ftfy

    rng = random.Random(3)
    alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r", "\r\n", "<b>", ";", "#39;", "\\"]
    checked = 0
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if tk._is_fast_text(text):
            assert ftfy.fix_text(text).split() == text.split() and html.unescape(text) == text, repr(text)
            checked += 1
    assert checked > 1000
    assert not tk._is_fast_text("a&amp;b") and not tk._is_fast_text("caf\u00e9") and not tk._is_fast_text("\x1b[0m")


def _plain_merge(symbols, ranks):
    """The reference algorithm: merge the lowest-ranked pair everywhere, left to right; rescan; repeat."""
    while len(symbols) > 1:
        found = [(ranks[f"{a} {b}"], i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if f"{a} {b}" in ranks]
        if not found:
            break
        first, second = symbols[min(found)[1]], symbols[min(found)[1] + 1]
        out, i = [], 0
        while i < len(symbols):
            if symbols[i:i + 2] == [first, second]:
                out.append(first + second)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def test_heap_merge_equals_plain_merge(tok):
    ranks = tok.vocab.ranks
    rng = random.Random(5)
    byte_chars = dict(tk._byte_chars())
    for _ in range(300):
        word = "".join(rng.choice("aeioustnrlhpqxyz\u00e9\u732b") for _ in range(rng.randint(1, 90)))
        piece = "".join(byte_chars[b] for b in word.encode("utf-8"))
        symbols = [*piece[:-1], piece[-1] + "</w>"]
        assert tk._merge(symbols, ranks) == _plain_merge(symbols, ranks), word


def test_merge_list_only_merges_symbols_made_before(tok):
    """The heap merge relies on it: a merge's parts are bytes or results of lower-ranked merges."""
    known = set(tok.vocab.pieces[:512])
    for line in tok.vocab.ranks:
        first, second = line.split(" ")
        assert first in known and second in known, line
        known.add(first + second)


def test_long_words_match_reference(tok, ref):
    rng = random.Random(11)
    for n in (25, 60, 200, 400):
        word = "".join(rng.choice("abcdefghij") for _ in range(n))
        assert tok.encode(word) == ref.encode(word)


def test_constants_and_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (BOS_ID, EOS_ID, VOCAB_SIZE) == (49406, 49407, 49408)
    assert len(tok.vocab.pieces) == VOCAB_SIZE
    assert tok.encode("<|startoftext|>a <|endoftext|>") == [BOS_ID, 320, EOS_ID]
    renamed = CLIPTokenizer(special_tokens=tk.OPEN_CLIP_SPECIAL_TOKENS)
    assert renamed.encode("<start_of_text>a<end_of_text>") == [BOS_ID, 320, EOS_ID]
    assert renamed.encode("a photo, of a cat") == tok.encode("a photo, of a cat")
    assert len(tok.encode("<end_of_text>")) > 1  # open_clip 3.x spelling: plain text for OpenAI's tokenizer
    # the unmodified open_clip 3.x tokenizer agrees with the renamed one
    assert renamed.encode("x <end_of_text> <|endoftext|>") == open_clip_module("tokenizer").SimpleTokenizer().encode(
        "x <end_of_text> <|endoftext|>")


def test_decode_matches_reference_and_token_strings(tok, ref):
    for p in _prompts(60, seed=9):
        ids = tok.encode(p)
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode([BOS_ID, 320, EOS_ID]) == ref.decode([BOS_ID, 320, EOS_ID])
    assert tok.token_strings(tok.encode("photorealistic, cat")) == ["photo", "realistic", ",", "cat"]
    assert tok.token_strings(tok.encode("\U0001f600")) == ["\U0001f600"]
    split = tok.token_strings(tok.encode("\U0001fae0"))  # a newer emoji, split across byte-level tokens
    assert "".join(split).startswith("<0xF0>") or split == ["\U0001fae0"]


def test_bytes_input_and_errors(tok):
    assert tok.encode("café".encode("utf-8")) == tok.encode("café")
    with pytest.raises(PromptError, match=r"text is not UTF-8.*\\xff.*offset 2"):
        tok.encode(b"ab\xffcd")
    with pytest.raises(PromptError, match=r"caption is not UTF-8"):
        tk.decode_prompt_bytes(b"\xc3", "caption")
    for bad in (None, 5, ["a"], 1.5):
        with pytest.raises(PromptError, match="text must be a string"):
            tok.encode(bad)
    with pytest.raises(PromptError, match=r"unpaired surrogate U\+D800 at index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(PromptError, match=r"U\+DCFF at index 0 \(the byte 0xFF"):
        tok.encode("\udcff")  # what os.fsdecode makes of a non-UTF-8 argv byte
    with pytest.raises(PromptError, match="token id 49408"):
        tok.decode([1, 49408])
    with pytest.raises(PromptError, match="token id -1"):
        tok.token_strings([-1])
    with pytest.raises(PromptError, match="vocab_path"):
        CLIPTokenizer("/nonexistent/bpe.txt.gz").encode("a")


def test_surrogate_pair_is_joined_as_in_reference(tok, ref):
    text = "a\ud83d\ude00b"
    assert tok.encode(text) == ref.encode(text)


def test_caches_are_bounded_and_per_instance():
    small = CLIPTokenizer(cache_size=4)
    words = [f"word{i}" for i in range(50)]
    first = [small.encode(w) for w in words]
    assert small._word_ids.cache_info().currsize <= 4
    assert small._piece_ids.cache_info().currsize <= 4
    assert [small.encode(w) for w in words] == first


def test_instances_share_loaded_tables_but_not_caches():
    a, b = CLIPTokenizer(), CLIPTokenizer()
    assert a.encode("a cat") == b.encode("a cat")
    assert a.vocab is b.vocab and a._word_ids is not b._word_ids
    assert CLIPTokenizer(special_tokens=tk.OPEN_CLIP_SPECIAL_TOKENS).vocab is not a.vocab


def test_lazy_and_light_import():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from clipdiffusion.text.tokenizer import CLIPTokenizer\n"
        "tok = CLIPTokenizer(); assert tok._vocab is None\n"
        "assert not {'torch', 'ftfy', 'regex'} & set(sys.modules), sorted(sys.modules)\n"
        "assert tok.encode('a photo of a cat') == [320, 1125, 539, 320, 2368]\n"
        "assert 'torch' not in sys.modules and 'ftfy' not in sys.modules\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
