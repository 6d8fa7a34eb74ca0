"""English word lists for negative-label mining (NegLabel, AdaNeg).

`wordnet_words` reads WordNet 3.0's ``data.noun`` / ``data.adj`` files directly (Debian's
``wordnet-base`` installs them under ``/usr/share/wordnet``), falling back to nltk's WordNet
corpus when installed. `load_word_list` reads any user word list (one entry a line).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["find_wordnet_dir", "load_word_list", "read_wordnet_data", "wordnet_words"]

_POS_FILES = {"noun": "data.noun", "adj": "data.adj", "verb": "data.verb", "adv": "data.adv"}
_SEARCH = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict")


def find_wordnet_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The first directory holding ``data.noun``: ``path``, ``$WORDNET_DIR``, system copies."""
    candidates = [path, os.environ.get("WORDNET_DIR"), *_SEARCH]
    for c in candidates:
        if c and (Path(c) / "data.noun").exists():
            return Path(c)
    return None


def _clean(lemma: str) -> str:
    # adjectives may carry a syntactic marker: "outback(a)", "ready_to_hand(p)", "(ip)"
    if lemma.endswith(")") and "(" in lemma:
        lemma = lemma[: lemma.rindex("(")]
    return lemma.replace("_", " ").strip()


def read_wordnet_data(path: str | os.PathLike) -> list[str]:
    """Lemmas of one WordNet ``data.<pos>`` file, in file order, with duplicates removed.

    Format of a data line: ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...]
    p_cnt ... | gloss`` where ``w_cnt`` is a two-digit hexadecimal count; lines starting with
    spaces are the licence header.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"WordNet data file {path} does not exist.")
    words: dict[str, None] = {}
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith(" "):
                continue
            parts = line.split(" | ", 1)[0].split()
            try:
                count = int(parts[3], 16)
                for i in range(count):
                    word = _clean(parts[4 + 2 * i])
                    if word:
                        words.setdefault(word, None)
            except (IndexError, ValueError) as exc:
                raise ValueError(
                    f"{path}:{lineno} is not a WordNet data line ({exc}); expected "
                    "'offset lex_filenum ss_type w_cnt word lex_id ...'."
                ) from exc
    return list(words)


def wordnet_words(pos: Sequence[str] = ("noun", "adj"), path: str | os.PathLike | None = None) -> list[str]:
    """WordNet lemmas (spaces for underscores) of the given parts of speech, deduplicated.

    NegLabel mines its negatives from WordNet nouns and adjectives (about 100k words).
    """
    bad = [p for p in pos if p not in _POS_FILES]
    if bad or not pos:
        raise ValueError(f"pos must name some of {sorted(_POS_FILES)}, got {list(pos)}.")
    folder = find_wordnet_dir(path)
    words: dict[str, None] = {}
    if folder is not None:
        for p in pos:
            for w in read_wordnet_data(folder / _POS_FILES[p]):
                words.setdefault(w, None)
        return list(words)
    if path is not None:
        raise ValueError(f"No WordNet data files (data.noun) under {path}.")
    try:
        from nltk.corpus import wordnet as wn  # type: ignore

        tags = {"noun": "n", "adj": "a", "verb": "v", "adv": "r"}
        for p in pos:
            for syn in wn.all_synsets(tags[p]):
                for lemma in syn.lemma_names():
                    words.setdefault(lemma.replace("_", " "), None)
        if words:
            return list(words)
    except (ImportError, LookupError):
        pass
    raise ValueError(
        "WordNet was not found: install Debian's `wordnet-base` (files under /usr/share/wordnet), "
        "set WORDNET_DIR to a folder with data.noun/data.adj, install nltk with its wordnet "
        "corpus, or pass your own word list (words=[...] or a file path)."
    )


def load_word_list(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Words from a file (one a line; ``#`` comments and blank lines skipped) or an iterable.

    Duplicates are dropped (first occurrence kept). An empty result is an error.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"Word list file {path} does not exist (expected one word per line).")
        lines = path.read_text(encoding="utf-8").splitlines()
        origin = str(path)
    else:
        lines = [str(w) for w in source]
        origin = "the given word list"
    words: dict[str, None] = {}
    for line in lines:
        w = line.strip()
        if w and not w.startswith("#"):
            words.setdefault(w, None)
    if not words:
        raise ValueError(f"{origin} contains no words; give at least one word (one per line).")
    return list(words)
