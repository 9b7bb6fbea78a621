"""The model input shared by every model: the recipe's template and its budgeted truncation.

Text = template with {prompt}, {a}, {b} (params.yaml `text`). Truncation, as in the recipe:
  1. words: prompt to `prompt_words`, each response to `response_words` (always applied);
  2. tokens, only when the whole input is over max_length: prompt to `prompt_tokens`, then cut
     the end of the longer answer until both are equal (or it fits), then both equally.

Ids are built by concatenating the token ids of the separately tokenised pieces (specials,
template literals, prompt, a, b), never by re-tokenising the joined string: the cut is exact,
and swapping A and B swaps exactly the two answer segments (TTA relies on it).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

FIELDS = ("prompt", "a", "b")
# Optional fields: each answer's length in words before any truncation. The recipe's truncation
# cuts the longer answer to the shorter one's length, so a model that reads only the cut text
# cannot see which answer was longer; these fields state it (used by the tiny and small profiles).
LENGTH_FIELDS = ("a_words", "b_words")
_WORD = re.compile(r"\S+")


def join_turns(turns) -> str:
    """Turns joined with newlines (a prompt's turns; each response's turns separately)."""
    return "\n".join("" if t is None else str(t) for t in turns)


def truncate_words(text: str, n: int) -> str:
    """First n whitespace-separated words, keeping the kept part's original spacing.

    A text with <= n words comes back unchanged (trailing whitespace included); else the cut
    is right after the n-th word (n <= 0 keeps nothing).
    """
    end = 0
    for i, m in enumerate(_WORD.finditer(text)):
        if i >= n:          # an (n+1)-th word exists: cut after the n-th
            return text[:end]
        end = m.end()
    return text


def word_count(turns) -> int:
    """Words of an answer over all its turns, before truncation (the {a_words}/{b_words} fields)."""
    return len(_WORD.findall(join_turns(turns)))


def _word_parts(prompt, response_a, response_b, text_cfg: dict) -> tuple[str, str, str]:
    return (truncate_words(join_turns(prompt), text_cfg["prompt_words"]),
            truncate_words(join_turns(response_a), text_cfg["response_words"]),
            truncate_words(join_turns(response_b), text_cfg["response_words"]))


def format_text(prompt, response_a, response_b, text_cfg: dict) -> str:
    """The template filled with the word-truncated parts (for humans, GPTQ calibration, logs)."""
    p, a, b = _word_parts(prompt, response_a, response_b, text_cfg)
    return text_cfg["template"].format(prompt=p, a=a, b=b, a_words=word_count(response_a),
                                       b_words=word_count(response_b))


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """A tokenizer's view of a template: special prefix/suffix and the literal pieces' ids.

    literals[i] precedes the part fields[i]; literals[-1] ends the text.
    """
    prefix: list[int]
    suffix: list[int]
    literals: list[list[int]]
    fields: tuple[str, ...]

    @property
    def fixed_length(self) -> int:
        return len(self.prefix) + len(self.suffix) + sum(map(len, self.literals))


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # batched (one Rust call); verbose=False silences the "longer than model_max_length"
    # warning: truncation is ours, done on the ids below
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds around one sequence, e.g. [CLS]/[SEP] or [BOS]/[].

    Supports the `build_inputs_with_special_tokens` API where present, else probes a one-word
    encoding with and without specials. Raises ValueError when the probe is not found inside
    the special-token encoding (a post-processor that rewrites the content).
    """
    probe = _tokenize(tokenizer, ["a"])[0]
    if hasattr(tokenizer, "build_inputs_with_special_tokens"):
        full = list(tokenizer.build_inputs_with_special_tokens(probe))
    else:
        full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(probe) + 1):
        if full[i:i + len(probe)] == probe:
            return full[:i], full[i + len(probe):]
    raise ValueError(f"cannot locate content {probe} in special-token encoding {full}")


def template_layout(tokenizer, template: str) -> Layout:
    """Split `template` on its fields and tokenise the literals (once per tokenizer, template).

    Raises ValueError unless the template has exactly the fields {prompt}, {a}, {b}, once each.
    """
    literals, fields = [], []
    for literal, field, spec, conv in string.Formatter().parse(template):
        literals.append(literal)
        if field is not None:
            if field not in FIELDS + LENGTH_FIELDS or spec or conv:
                raise ValueError(f"template field {{{field}}} not one of {FIELDS + LENGTH_FIELDS} (no format specs)")
            fields.append(field)
    lengths = sorted(f for f in fields if f in LENGTH_FIELDS)
    if sorted(f for f in fields if f in FIELDS) != sorted(FIELDS) or lengths not in ([], sorted(LENGTH_FIELDS)):
        raise ValueError(f"template needs each of {FIELDS} once (and optionally both of {LENGTH_FIELDS} once), "
                         f"got {fields}")
    if len(literals) == len(fields):      # template ends with a field: empty closing literal
        literals.append("")
    prefix, suffix = special_tokens(tokenizer)
    return Layout(prefix, suffix, _tokenize(tokenizer, literals), tuple(fields))


# --------------------------------------------------------------------------- encoding

@dataclass(frozen=True)
class EncodedParts:
    """One row's id segments; `ids` assembles them. Swapping a and b here = swapping the row."""
    layout: Layout
    prompt: list[int]
    a: list[int]
    b: list[int]
    a_words: list[int] = ()   # the {a_words}/{b_words} segments (empty when the template has none)
    b_words: list[int] = ()

    @property
    def ids(self) -> list[int]:
        out = list(self.layout.prefix)
        for literal, field in zip(self.layout.literals, self.layout.fields):
            out += literal + list(getattr(self, field))
        return out + self.layout.literals[-1] + self.layout.suffix

    def swapped(self) -> "EncodedParts":
        return EncodedParts(self.layout, self.prompt, self.b, self.a, self.b_words, self.a_words)


def answer_budget(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Kept lengths of the two answers within `budget` tokens (the recipe's rule, closed form).

    Cut the longer until equal, then both equally: the shorter keeps min(its length, budget//2),
    the longer the rest. Equal lengths keep budget//2 each (an odd token is dropped: giving it
    to one side would depend on position and break the swap symmetry).
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    if len_a == len_b:
        return budget // 2, budget // 2
    short = min(len_a, len_b, budget // 2)
    long_ = min(max(len_a, len_b), budget - short)
    return (long_, short) if len_a > len_b else (short, long_)


def _fit(layout: Layout, p: list[int], a: list[int], b: list[int], max_length: int,
         prompt_tokens: int, a_words: list[int] = (), b_words: list[int] = ()) -> EncodedParts:
    fixed = layout.fixed_length + len(a_words) + len(b_words)   # the length fields are never cut
    if fixed > max_length:
        raise ValueError(f"template alone is {fixed} tokens (specials {len(layout.prefix)}+"
                         f"{len(layout.suffix)}, literals {[len(x) for x in layout.literals]}), "
                         f"over max_length={max_length}")
    if fixed + len(p) + len(a) + len(b) > max_length:
        # a long prompt would otherwise eat the answers; past zero answers the prompt gives way too
        p = p[:min(prompt_tokens, max_length - fixed)]
        ka, kb = answer_budget(len(a), len(b), max_length - fixed - len(p))
        a, b = a[:ka], b[:kb]
    return EncodedParts(layout, p, a, b, a_words, b_words)


def encode_pair_parts(prompt, response_a, response_b, tokenizer, max_length: int, text_cfg: dict,
                      layout: Layout | None = None) -> EncodedParts:
    """The row's truncated id segments (see `encode_pair`); pass `layout` to reuse it across rows."""
    layout = layout or template_layout(tokenizer, text_cfg["template"])
    texts = list(_word_parts(prompt, response_a, response_b, text_cfg))
    if LENGTH_FIELDS[0] in layout.fields:
        texts += [str(word_count(response_a)), str(word_count(response_b))]
    p, a, b, *lengths = _tokenize(tokenizer, texts)
    return _fit(layout, p, a, b, max_length, text_cfg["prompt_tokens"], *lengths)


def encode_pair(prompt, response_a, response_b, tokenizer, max_length: int, text_cfg: dict) -> list[int]:
    """Input ids of one battle (turn lists), at most max_length long, specials included.

    text_cfg: template, prompt_words, response_words, prompt_tokens. Symmetric in A/B:
    encode_pair(p, b, a) is encode_pair(p, a, b) with the answer segments exchanged.
    Raises ValueError when the template and special tokens alone exceed max_length, or when
    the template lacks one of {prompt}, {a}, {b}.
    """
    return encode_pair_parts(prompt, response_a, response_b, tokenizer, max_length, text_cfg).ids


def encode_rows(df, tokenizer, max_length: int, text_cfg: dict, swap: bool = False) -> list[list[int]]:
    """encode_pair for each row of a canonical table (prompt/response_a/response_b turn lists).

    swap=True exchanges A and B first (the TTA copy). A progress bar shows past 2000 rows.
    Raises what encode_pair raises, and KeyError when a column is missing.
    """
    layout = template_layout(tokenizer, text_cfg["template"])
    col_a, col_b = ("response_b", "response_a") if swap else ("response_a", "response_b")
    rows = zip(df["prompt"], df[col_a], df[col_b])
    if len(df) > 2000:
        from tqdm.auto import tqdm
        rows = tqdm(rows, total=len(df), desc="encode", unit="row")
    return [encode_pair_parts(p, a, b, tokenizer, max_length, text_cfg, layout).ids for p, a, b in rows]
