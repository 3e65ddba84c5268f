"""GGUF's byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``) out of and into a HuggingFace
``tokenizers`` Tokenizer, with llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``).

A byte-level BPE tokenizer splits text into pieces with one or more regular expressions before
it merges bytes; the GGUF file names that split (``gpt-2``, ``llama-bpe``, ``qwen2``, ``smollm``,
...) and llama.cpp holds the expressions (src/llama-vocab.cpp, ``llm_tokenizer_bpe``; which
names share one split and which ignore merges for a whole word in the vocabulary:
``llama_vocab::impl::load``). ``PRE_TOKENIZERS`` copies them, so that an imported tokenizer gives
llama.cpp's token ids (tests/integration/test_gguf_pretokenizers.py compares them name by name).

The expressions are llama.cpp's, in the Oniguruma syntax ``tokenizers`` reads. Two differences in
how the two read them are undone here: llama.cpp matches an expression without ``\\p{...}``
categories against the text with every non-ASCII space replaced by ``\\v``, so a class of
non-ASCII ranges never matches such a space (``_spaceless``); and one with categories against a
text where every letter is one symbol, so letter-case classes mean any letter (``_any_case``).
Names whose split llama.cpp hand-codes beyond a regular expression (``kimi-k2``, ``afmoe``),
splits with empty matches (``superbpe``) or with ASCII-only ``\\d`` and ``\\b`` (``tiny_aya``),
and tokenizers that are not byte-level (``gemma4``, ``whitespace``, ...) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.interop.hf import PAD_TOKENS
from lmforge.tokenization.tokenizer import UNK_TOKEN

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, CONTROL, UNUSED = 1, 3, 5

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
_DEEPSEEK3_SPLIT = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _cased_words(suffix: str) -> str:
    """llama.cpp's stand-in for [\\p{Lu}...]*[\\p{Ll}...]+ (upper then lower case letters) plus ``suffix``."""
    upper, lower = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
    lead = r"[^\r\n\p{L}\p{N}]?"
    return f"{lead}{upper}*{lower}+{suffix}|{lead}{upper}+{lower}*{suffix}"

# Unicode's spaces beyond ASCII. llama.cpp matches an expression without categories against the
# text with each of these replaced by \v, so a class of non-ASCII ranges never matches them.
_WIDE_SPACES = "\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _spaceless(ranges: str) -> str:
    """The class of ``ranges`` less the non-ASCII spaces, as llama.cpp reads it (see _WIDE_SPACES)."""
    return f"[{ranges}&&[^{_WIDE_SPACES}]]"


def _any_case(regex: str) -> str:
    """``regex`` with the letter-case classes as llama.cpp reads them: it matches categories on a
    text where every letter is one "letter" symbol, so ``\\p{Lu}``, ``\\p{Ll}``, ... all mean ``\\p{L}``."""
    for case in ("Lu", "Ll", "Lt", "Lm", "Lo"):
        regex = regex.replace(f"\\p{{{case}}}", "\\p{L}")
    return regex


_CJK = _spaceless("\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff") + "+"
_BLOOM_SPLIT = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's split for a group of ``tokenizer.ggml.pre`` names: expressions applied in
    turn (each splits the pieces of the one before; what it does not match stays a piece), and
    whether a piece found whole in the vocabulary skips the merges."""

    names: tuple[str, ...]
    regexes: tuple[str, ...]
    ignore_merges: bool = False


_GROUPS = (
    PreTokenizer(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                  "mellum", "modern-bert", "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo",
                  "jais", "trillion", "granite-docling"), (GPT2_SPLIT,)),
    PreTokenizer(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano"), (LLAMA3_SPLIT,), ignore_merges=True),
    PreTokenizer(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), (LLAMA3_SPLIT,)),  # Llama 3's split, with merges
    PreTokenizer(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
                  "grok-2"), (QWEN2_SPLIT,)),
    PreTokenizer(("qwen35",), (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    PreTokenizer(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                 (r"\p{N}", GPT2_SPLIT)),
    PreTokenizer(("default",), (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    PreTokenizer(("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]")),
    PreTokenizer(("deepseek-llm",), (
        r"[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
        "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
        "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
        "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
        "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
        "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+",
        "\\s?" + _spaceless("!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002") + "+",
        r"\s+\z",  # llama.cpp's "\s+$": std::regex's $ ends the piece, Oniguruma's would end a line
        _CJK,
        r"\p{N}+")),
    PreTokenizer(("deepseek-coder",), (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                                       _CJK, r"\p{N}")),
    PreTokenizer(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
                 (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3_SPLIT)),
    PreTokenizer(("poro-chat", "bloom", "gpt3-finnish"), (_BLOOM_SPLIT,)),
    PreTokenizer(("viking",), (_BLOOM_SPLIT, r"\p{N}")),
    PreTokenizer(("tekken",), (_cased_words("") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                               r"|\s+(?!\S)|\s+",), ignore_merges=True),
    PreTokenizer(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
                 (_cased_words(_CONTRACTIONS + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    PreTokenizer(("bailingmoe", "bailingmoe2", "llada-moe"),
                 (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]|\s+(?!\S)|\s+",)),
    PreTokenizer(("seed-coder",), (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                                   r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    PreTokenizer(("ufakzeka",), (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                                 r"|\s+(?!\S)|\s+",)),
    PreTokenizer(("laguna",), (r"[^\n]+|[\n]+", QWEN2_SPLIT)),
    PreTokenizer(("exaone-moe",), (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",)),
    PreTokenizer(("jais-2",), (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                               + r"|\s*[\r\n]+" + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8))
                               + r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",)),
    PreTokenizer(("spark2_5",), (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                                 r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                                 r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}")),
    PreTokenizer(("youtu",), (
        "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
        "\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        _any_case(r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
                  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS
                  + r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")), ignore_merges=True),
    PreTokenizer(("minicpm5",), (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True),
)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {name: group for group in _GROUPS for name in group.names}


def hf_pre_tokenizer(name: str):
    """The ``tokenizers`` pre-tokenizer that splits as llama.cpp's ``tokenizer.ggml.pre = name``."""
    from tokenizers import Regex, pre_tokenizers

    group = PRE_TOKENIZERS[name]
    if group.regexes == (GPT2_SPLIT,):  # GPT-2's own split: what lmforge's BPE vocabularies use
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in group.regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """The ``tokenizer.ggml.pre`` name of a byte-level BPE ``tokenizer.json`` (a dict), or None
    when its split is none llama.cpp knows by name (or it is not byte-level BPE at all)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or tokenizer_json.get("normalizer") is not None:
        return None
    split = _split_of(tokenizer_json.get("pre_tokenizer") or {})
    ignore_merges = bool(model.get("ignore_merges", False))
    for group in _GROUPS:
        wanted = ("gpt2",) if group.regexes == (GPT2_SPLIT,) else group.regexes
        if split == wanted and ignore_merges == group.ignore_merges:
            return group.names[0]
    return None


def _split_of(pre: dict) -> tuple[str, ...] | None:
    """What a tokenizer.json pre-tokenizer splits with: ``("gpt2",)`` for GPT-2's byte-level
    split, the expressions of a sequence of isolating splits before a plain byte-level mapping,
    or None for anything else (a prefix space, inverted or merged splits, ...)."""
    if pre.get("type") == "ByteLevel":
        plain = not pre.get("add_prefix_space", False) and pre.get("use_regex", True)
        return ("gpt2",) if plain else None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    last = steps[-1] if steps else {}
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space", False) or last.get("use_regex", True):
        return None
    regexes = []
    for step in steps[:-1]:
        pattern = step.get("pattern") or {}
        if step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert") \
                or "Regex" not in pattern:
            return None
        regexes.append(pattern["Regex"])
    return tuple(regexes)


# ---------------------------------------------------------------------------------------------
# Out: a tokenizer.json as GGUF metadata
# ---------------------------------------------------------------------------------------------


def write_tokenizer(writer, tokenizer_json: dict, pre: str, vocab_size: int, eot_id: int) -> None:
    """GGUF's ``gpt2`` tokenizer: tokens by id, merges, token types, the split and the special ids."""
    vocab = dict(tokenizer_json["model"]["vocab"])
    special = {t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    for added in tokenizer_json.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    by_id = {i: token for token, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise LmforgeError(f"the tokenizer has ids up to {max(by_id)} but model.vocab_size={vocab_size}; "
                           "the model directory is inconsistent (retrain or re-import it).")
    # Ids the tokenizer never produces (a model wider than its vocabulary) are named as llama.cpp names them.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in by_id else CONTROL if by_id[i] in special else NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot_id)
    writer.add_eos_token_id(eot_id)
    writer.add_add_bos_token(False)  # our models were trained on documents without a leading token
    writer.add_add_eos_token(False)
    if UNK_TOKEN in vocab:
        writer.add_unk_token_id(vocab[UNK_TOKEN])
    pad = next((t for t in PAD_TOKENS if t in vocab), None)
    if pad is not None:
        writer.add_pad_token_id(vocab[pad])


# ---------------------------------------------------------------------------------------------
# In: GGUF metadata as a tokenizer
# ---------------------------------------------------------------------------------------------


def tokenizer_from_gguf(fields: dict[str, Any], source: Path):
    """(HuggingFace byte-level BPE Tokenizer, end-of-text id) from GGUF's ``gpt2`` tokenizer metadata.

    The split is ``tokenizer.ggml.pre``'s (llama.cpp's ``default`` when the key is absent, as
    llama.cpp reads such a file); a name lmforge does not implement is refused in one sentence.
    """
    from tokenizers import Tokenizer, decoders, models

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2" or "tokenizer.ggml.tokens" not in fields:
        raise LmforgeError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; lmforge imports GGUF's 'gpt2' "
                           "(byte-level BPE) tokenizer only.")
    pre = str(fields.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise LmforgeError(f"{source}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer lmforge does not implement, so "
                           f"its token ids would differ from llama.cpp's; lmforge implements {len(PRE_TOKENIZERS)} of "
                           "llama.cpp's names (gpt-2, llama-bpe, qwen2, smollm, deepseek-v3, gpt-4o, ...: see the "
                           "HF and GGUF page of the docs).")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=PRE_TOKENIZERS[pre].ignore_merges))
    tokenizer.pre_tokenizer = hf_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, types) if kind == CONTROL])
    eot_id = fields.get("tokenizer.ggml.eos_token_id")
    if eot_id is None or not 0 <= int(eot_id) < len(tokens):
        raise LmforgeError(f"{source} names no valid end-of-text token (tokenizer.ggml.eos_token_id); "
                           "add one and import again.")
    return tokenizer, int(eot_id)
