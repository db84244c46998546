"""The server's preflight refuses a site whose genomic inputs measure a label fact (smm_model.contract.label_facts),
naming the site, the feature and the fact, unless the run sets ``data.allow_label_features``."""

from __future__ import annotations

import numpy as np
from server_fakes import config, site_summary

from server.federation.loop import screen_sites
from smm_model.contract.stats import GenomicsStats

CLEAN = ("g1", "g2", "g3")
LEAKY = ("g1", "CDKN2A_cnv", "IDH1_mut")


def summaries(cfg, features_of: dict[int, tuple[str, ...]]):
    """Preflight summaries whose schema matches ``cfg``; node -> its genomic feature names."""
    out = {}
    for nid, feats in features_of.items():
        s = site_summary(cfg, seed=nid)
        x = np.random.default_rng(nid).normal(0, 1, (40, len(feats)))
        s.genomics = GenomicsStats(feats, np.full(len(feats), 40), x.sum(0), (x * x).sum(0)).to_dict()
        out[nid] = s
    return out


def test_a_site_with_a_label_feature_is_refused_naming_site_feature_and_fact():
    cfg = config()
    accepted, refused, ref = screen_sites(summaries(cfg, {11: CLEAN, 12: CLEAN, 13: LEAKY}), cfg)
    assert sorted(accepted) == [11, 12] and ref == 11 and list(refused) == [13]
    msg = refused[13]
    assert msg.startswith("site 13: genomic feature(s) 'CDKN2A_cnv' (CDKN2A/B homozygous deletion), "
                          "'IDH1_mut' (IDH mutation) measure a fact the label rules read")
    assert "data.allow_label_features: true" in msg
    assert "genomics features differ" not in msg  # refused for the label features, not the list


def test_the_opt_in_accepts_the_sites():
    feats = {11: LEAKY, 12: LEAKY, 13: LEAKY}
    cfg = config()
    accepted, refused, _ = screen_sites(summaries(cfg, feats), cfg)
    assert accepted == {} and sorted(refused) == [11, 12, 13]
    assert all("'IDH1_mut' (IDH mutation)" in m for m in refused.values())
    cfg = config("data.allow_label_features=true")
    accepted, refused, ref = screen_sites(summaries(cfg, feats), cfg)
    assert sorted(accepted) == [11, 12, 13] and refused == {} and ref == 11


def test_near_misses_are_not_refused():
    feats = ("IDH3A_rnaseq", "IDH1_rnaseq", "CDKN2C_cnv", "MTAP_cnv", "CIC_mut")
    cfg = config()
    accepted, refused, _ = screen_sites(summaries(cfg, {11: feats, 12: feats}), cfg)
    assert sorted(accepted) == [11, 12] and refused == {}
