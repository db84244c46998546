"""The facts the label rules read, and the genomic features that measure them directly.

Why: the WHO 2021 diagnosis and the grade are *defined* by IDH mutation, 1p/19q codeletion,
CDKN2A/B homozygous deletion and the WHO grade (client/site/labels.py, ``who2021_diagnosis``). A model
whose genomic input holds ``IDH1_mut`` or ``CDKN2A_cnv`` can read the label off its input, and
its diagnosis AUC then says nothing about slides or expression. The rule that decides which
feature names are such a measurement lives here, once, in pure code, so that every place that
builds or accepts genomic inputs applies the same rule: ``smm tcga`` leaves these columns out,
``smm site check`` refuses a gene set that holds one, and the server's preflight
(``smm_model.contract.protocol.check_schemas``) refuses a site that sends one, unless the run opts in with
``data.allow_label_features``.

A pattern matches a whole feature name, case-insensitively. The patterns catch the spellings of a
*direct* measurement (a mutation call of IDH1/IDH2, the copy number of CDKN2A/CDKN2B or of the
9p21 band that holds them, arm-level copy number of 1p or 19q, a codeletion or grade column); they
deliberately leave alone the gene's expression (``IDH1_rnaseq``), neighbouring genes
(``IDH3A_rnaseq``, ``CDKN2C_cnv``, ``MTAP_cnv``) and correlated markers (``CIC_mut``,
``FUBP1_mut``, ``ATRX_mut``). Those may still carry information about the labels; they are inputs
the reference model could learn from too, not the label written down.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LabelFact", "LABEL_FACTS", "FACT_NAMES", "OPT_IN_HINT", "fact", "label_fact_of", "label_feature_hits",
           "describe_hits"]

#: Separator between the parts of a feature name: ``IDH1_mut``, ``IDH1-mut``, ``IDH1.mut``, ``IDH1 mut``.
_SEP = r"[_\-. ]?"
#: Suffixes that mean "a copy-number value" (GISTIC, log ratio, deletion call, status).
_CN = r"(cnv|cna|cn|copy_?number|gistic|del|deletion|homdel|hom_?del|loss|status|call)"


@dataclass(frozen=True)
class LabelFact:
    """One fact a label rule reads.

    ``name`` is the clinical.csv column the rule reads it from (client/site/labels.py); ``what`` says
    it in words for messages; ``patterns`` are regular expressions (whole name, case-insensitive)
    for genomic feature names that measure the fact directly.
    """

    name: str
    what: str
    patterns: tuple[str, ...]

    def matches(self, feature: str) -> bool:
        return any(re.fullmatch(p, feature.strip(), flags=re.IGNORECASE) for p in self.patterns)


#: The facts of the diagnosis rule, in the order of clinical.csv's label columns. The grade task
#: reads ``grade`` alone.
LABEL_FACTS: tuple[LabelFact, ...] = (
    LabelFact("idh", "IDH mutation", (
        rf"idh[12]?{_SEP}(mut|muts|mutation|mutated|mutant|status|snv|variant|wt|wild{_SEP}type|subtype"
        rf"|codel{_SEP}subtype|r132h?|r172[a-z]?)",
        r"idh",  # not "IDH1" alone: a table may name expression columns by the bare gene symbol
    )),
    LabelFact("codel_1p19q", "1p/19q codeletion", (
        r"(chr)?1p[_\-./ ]?(and[_\-. ])?(chr)?19q(" + _SEP + r"(codel|codeletion|co-?deletion|status|cnv|del))?",
        rf"(codel|codeletion|co-?deletion){_SEP}(1p{_SEP}19q)?",
        rf"(chr)?(1p|19q)({_SEP}arm)?({_SEP}{_CN})?",
    )),
    LabelFact("cdkn2ab", "CDKN2A/B homozygous deletion", (
        rf"cdkn2(a|b|ab|a/b|a_b|a-b){_SEP}{_CN}",
        r"cdkn2ab",  # not "CDKN2A" alone (a bare gene symbol may be expression)
        rf"(chr)?9p21(\.3)?({_SEP}{_CN})?",
    )),
    LabelFact("grade", "WHO grade", (
        rf"((who|who{_SEP}20(07|16|21)|histolog(y|ic|ical)|tumou?r|cns){_SEP})?grade({_SEP}(who|class|group|status))?",
    )),
)
#: The clinical columns the diagnosis rule reads (client/site/labels.py takes its columns from here).
FACT_NAMES: tuple[str, ...] = tuple(f.name for f in LABEL_FACTS)
#: What every refusal says about the way out (the site check and the server's preflight alike).
OPT_IN_HINT = ("remove them from the gene set, or set data.allow_label_features: true to train on them anyway "
               "(the run's report then warns that its inputs may encode the labels)")


def fact(name: str) -> LabelFact:
    """The declared fact ``name`` (KeyError naming the declared ones otherwise)."""
    for f in LABEL_FACTS:
        if f.name == name:
            return f
    raise KeyError(f"no label fact {name!r}; declared: {list(FACT_NAMES)}")


def label_fact_of(feature: str) -> LabelFact | None:
    """The fact ``feature`` measures directly, or None (the first declared fact that matches)."""
    return next((f for f in LABEL_FACTS if f.matches(feature)), None)


def label_feature_hits(features: Iterable[str]) -> list[tuple[str, str]]:
    """``(feature, fact name)`` for every feature that measures a label fact directly, in input order."""
    hits = []
    for feat in features:
        f = label_fact_of(str(feat))
        if f is not None:
            hits.append((str(feat), f.name))
    return hits


def describe_hits(hits: list[tuple[str, str]], limit: int = 5) -> str:
    """``'IDH1_mut' (IDH mutation), ...`` for messages; past ``limit`` features, how many more."""
    shown = ", ".join(f"{feat!r} ({fact(name).what})" for feat, name in hits[:limit])
    return shown + (f" and {len(hits) - limit} more" if len(hits) > limit else "")
