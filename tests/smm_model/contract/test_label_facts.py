"""smm_model.contract.label_facts: which genomic feature names measure a label fact directly, and which do not."""

from __future__ import annotations

import pytest

from smm_model.contract.label_facts import FACT_NAMES, LABEL_FACTS, fact, label_fact_of, label_feature_hits

#: Spellings of a direct measurement of each fact (a site's own export, or a clinical column copied over).
HITS = {
    "idh": ["IDH1_mut", "IDH2_mut", "idh1_mutation", "IDH1-mutated", "IDH_status", "IDH", "IDHwt", "IDH1_R132H",
            "IDH2.mut", "idh_subtype"],
    "codel_1p19q": ["1p_cnv", "19q_cnv", "chr1p", "CHR19Q_arm_loss", "1p19q", "1p/19q", "1p_19q_codel",
                    "codel_1p19q", "codeletion", "1p_del"],
    "cdkn2ab": ["CDKN2A_cnv", "CDKN2B_cnv", "CDKN2A_del", "cdkn2a_homdel", "CDKN2AB", "CDKN2A/B_status",
                "9p21_cnv", "chr9p21.3_loss"],
    "grade": ["grade", "WHO_grade", "who grade", "Grade_WHO", "histological_grade", "tumor_grade",
              "who2021_grade"],
}
#: Near misses: expression of the same genes, neighbouring genes, correlated markers, other arms.
MISSES = ["IDH3A_rnaseq", "IDH1_rnaseq", "IDH2_rnaseq", "IDH1", "IDH3B_mut", "CDKN2C_cnv", "CDKN2A_rnaseq",
          "CDKN2A", "CDKN2AIP_rnaseq", "CDKN2A_mut", "MTAP_cnv", "CIC_mut", "FUBP1_mut", "ATRX_mut", "TP53_mut",
          "EGFR_cnv", "1q_cnv", "19p_cnv", "1p36_cnv", "upgrade", "GRADE1_rnaseq", "TP53_rnaseq"]


@pytest.mark.parametrize("name,feature", [(n, f) for n, fs in HITS.items() for f in fs])
def test_direct_measurements_are_flagged_with_their_fact(name, feature):
    assert label_fact_of(feature) is fact(name)
    assert label_feature_hits([feature]) == [(feature, name)]


@pytest.mark.parametrize("feature", MISSES)
def test_near_misses_are_not_flagged(feature):
    assert label_fact_of(feature) is None


def test_hits_keep_input_order_and_skip_the_rest():
    feats = ["TP53_rnaseq", "CDKN2B_cnv", "IDH3A_rnaseq", "IDH1_mut", "cdkn2c_cnv"]
    assert label_feature_hits(feats) == [("CDKN2B_cnv", "cdkn2ab"), ("IDH1_mut", "idh")]
    assert label_feature_hits([]) == []


def test_every_fact_is_declared_once_with_patterns():
    assert FACT_NAMES == ("idh", "codel_1p19q", "cdkn2ab", "grade")  # the clinical.csv columns the rules read
    assert all(f.patterns and f.what for f in LABEL_FACTS)
    # the clinical column itself, copied into a genomic table, is caught as its own fact
    assert [label_fact_of(n).name for n in FACT_NAMES] == list(FACT_NAMES)
    with pytest.raises(KeyError, match="declared"):
        fact("survival")


def test_the_module_stays_pure():
    import ast
    from pathlib import Path

    import smm_model.contract.label_facts as lf

    tree = ast.parse(Path(lf.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "re", "collections", "dataclasses"}
