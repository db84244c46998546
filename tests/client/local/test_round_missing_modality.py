"""A site without slides in a round (``client.local.round``): its preflight says what it holds, it
trains only what its data reaches and sends the rest back as received, and the list of what it
trained is a site-level fact (the same for any of its patients)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pandas as pd
import pytest
import torch
from sim_cohort import write_features_cohort
from site_config import make_cfg, two_threads  # noqa: F401  (two_threads: the module's autouse fixture)

from client.cohorts.synth import drop_slides
from client.local.round import SiteError, evaluate_round, preflight_summary, site_modalities, train_round, trained_tensors
from smm_model.contract.protocol import derive_shared
from smm_model.contract.sites import simulation_site_dirs
from smm_model.nn.model import build_model, trained_parameters


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = write_features_cohort(tmp_path_factory.mktemp("cohort"), sites=2, patients=16, feature_dim=32, seed=4)
    drop_slides(out / "site_2")
    return out


@pytest.fixture(scope="module")
def setting(cohort):
    cfg = make_cfg(cohort, "model.tasks=[diagnosis, grade, survival]")
    sites = simulation_site_dirs(cfg.data)
    summaries = [preflight_summary(d, cfg) for d in sites]
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    return cfg, sites, summaries, derive_shared(summaries, cfg), init


def test_the_preflight_says_which_modalities_the_site_holds(setting):
    _, _, summaries, shared, _ = setting
    full, genomics_only = summaries
    assert full.schema["modalities"] == ["histology", "genomics"] and full.schema["feature_dim"] == 32
    assert genomics_only.schema["modalities"] == ["genomics"]
    assert genomics_only.schema["feature_dim"] is None and genomics_only.schema["encoder"] is None
    assert shared.n_sites == 2


def test_a_site_without_slides_trains_only_what_its_data_reaches(setting):
    cfg, sites, _, shared, init = setting
    new, metrics, *_ = train_round(sites[1], cfg, shared, init, lr=3e-3, local_epochs=1, server_round=1)
    trained = trained_tensors(cfg, site_modalities(sites[1]))
    assert trained == trained_parameters(build_model(cfg.model), ["genomics"])
    for k, v in new.items():
        if k in trained:
            assert not torch.equal(v, init[k]), f"{k} was not trained"
        else:  # patch projection, attention...: sent back exactly as received
            assert torch.equal(v, init[k]), f"{k} changed at a site without slides"
    assert metrics["num-examples"] > 0 and torch.isfinite(torch.tensor(metrics["train-loss"]))
    # the full site trains everything
    assert trained_tensors(cfg, site_modalities(sites[0])) is None
    # evaluation predicts from genomics alone, with the same statistics as any site
    stats = evaluate_round(sites[1], cfg, shared, new, "val")
    assert stats.n > 0 and not stats.suppressed and sum(stats.confusion["diagnosis"]) > 0


def test_what_a_site_trained_does_not_depend_on_its_patients(setting, tmp_path):
    """Two different patient subsets of the same site send the same list (it is site-level)."""
    cfg, sites, _, shared, init = setting
    lists = []
    for keep in ("even", "odd"):
        d = shutil.copytree(sites[1], tmp_path / keep)
        clin = pd.read_csv(d / "clinical.csv", dtype=str, keep_default_na=False)
        rows = clin.index % 2 == (0 if keep == "even" else 1)
        clin[rows].to_csv(d / "clinical.csv", index=False)
        sub_cfg = make_cfg(tmp_path, "model.tasks=[diagnosis, grade, survival]")
        new, *_ = train_round(d, sub_cfg, shared, init, lr=3e-3, local_epochs=1, server_round=1)
        lists.append((trained_tensors(sub_cfg, site_modalities(d)), {k for k in new if not torch.equal(new[k], init[k])}))
    assert lists[0][0] == lists[1][0]
    # and it is what each subset's training really changed
    assert lists[0][1] == set(lists[0][0]) == lists[1][1]


def test_a_site_without_slides_cannot_train_abmil(setting):
    cfg, sites, _, shared, _ = setting
    cfg = replace(cfg, model=replace(cfg.model, arch="abmil"))
    torch.manual_seed(0)
    init = build_model(cfg.model).state_dict()
    with pytest.raises(SiteError, match="E_CONFIG"):
        train_round(sites[1], cfg, shared, init, lr=3e-3, local_epochs=1, server_round=1)


def test_dp_sgd_at_a_site_without_slides_noises_only_what_it_trains(setting, tmp_path):
    """Under privacy.dp the weights the site does not train are not in the DP optimizer: they go back
    exactly as received (data-independent), the trained ones carry the noised steps."""
    cfg, sites, _, shared, init = setting
    cfg = make_cfg(cfg.data.sites_root, "model.tasks=[diagnosis, grade, survival]", "privacy.dp=true",
                   "privacy.dp_noise_multiplier=1.0", "privacy.dp_epsilon_budget=1000")
    new, metrics, *_ = train_round(sites[1], cfg, shared, init, lr=3e-3, local_epochs=1, server_round=1,
                                   ledger_path=tmp_path / "ledger.json")
    trained = set(trained_tensors(cfg, site_modalities(sites[1])))
    assert {k for k in new if not torch.equal(new[k], init[k])} == trained
    assert metrics["dp-epsilon"] > 0


def test_a_pooled_batch_mixes_patients_with_and_without_slides(setting):
    """Pooled (centralized) training stacks both sites' patients: placeholder bags have the model's
    width, the batch flags who has slides, and each patient is predicted from what it has."""
    from client.local.round import split_dataset, load_site
    from client.site.collate import collate_patients

    cfg, sites, _, shared, init = setting
    full, genomics_only = (split_dataset(load_site(d, cfg), cfg, shared, "train") for d in sites)
    batch = collate_patients([full[0], genomics_only[0], full[1]])
    assert batch.patches.shape[2] == cfg.model.feature_dim and batch.has_patches.tolist() == [True, False, True]
    model = build_model(cfg.model).eval()
    model.load_state_dict(init)
    out = model(batch)
    alone = model(collate_patients([genomics_only[0]]))
    for task, logits in out.logits.items():
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits[1], alone.logits[task][0], rtol=1e-5, atol=1e-5)


def test_a_site_without_genomics_trains_only_the_histology_path(setting, tmp_path):
    from client.cohorts.synth import drop_modality
    from server.federation.loop import screen_sites

    cfg, sites, summaries, shared, init = setting
    d = shutil.copytree(sites[0], tmp_path / "site_h")
    drop_modality(d, "genomics")
    summary = preflight_summary(d, cfg)
    assert summary.schema["modalities"] == ["histology"] and summary.genomics is None
    assert summary.schema["feature_dim"] == 32  # its histology schema is compared as any site's
    accepted, refused, ref = screen_sites({1: summaries[0], 2: summaries[1], 3: summary}, cfg)
    assert sorted(accepted) == [1, 2, 3] and refused == {} and ref == 1
    new, *_ = train_round(d, cfg, shared, init, lr=3e-3, local_epochs=1, server_round=1)
    trained = trained_tensors(cfg, site_modalities(d))
    assert trained == trained_parameters(build_model(cfg.model), ["histology"])
    assert {k for k in new if not torch.equal(new[k], init[k])} == set(trained)
    assert not any(k.startswith("gene_") for k in trained)
