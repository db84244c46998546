"""Central DP at the server (server/aggregation/central_dp.py): clip, noise on the sum, secret noise,
accounting across a resume, refusals, and a federation run that records it."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from server_fakes import Crash, FakeTransport, config, sites

from server.aggregation.central_dp import CentralDP, check_central_dp
from server.federation.loop import run_federation
from server.report.build import write_report
from server.runs.checkpoint import load_latest
from smm_model.config import ConfigError
from smm_model.contract.runfolder import read_rounds_file
from smm_model.contract.wire import TRAIN

CURRENT = {"w": np.zeros((2, 3), np.float32), "b": np.array([1.0, -1.0], np.float32), "count": np.array(7, np.int64)}


def update(scale: float) -> dict[str, np.ndarray]:
    return {"w": CURRENT["w"] + scale, "b": CURRENT["b"] + scale, "count": np.array(99, np.int64)}


def test_release_is_the_mean_of_clipped_updates_plus_noise_on_the_sum():
    """With negligible noise: site 1's delta (norm 2 * sqrt(8)) is clipped to C = 1, site 2's (norm
    0.01 * sqrt(8)) is not; each counts once whatever its size; integer arrays keep the current value."""
    dp = CentralDP(noise_multiplier=1e-12, clipping_norm=1.0, delta=1e-5)
    out, info = dp.release([update(2.0), update(0.01)], CURRENT)
    d1 = 2.0 / (2.0 * np.sqrt(8))  # clipped per coordinate
    expected = (d1 + 0.01) / 2
    np.testing.assert_allclose(out["w"], expected, atol=1e-9)
    np.testing.assert_allclose(out["b"], CURRENT["b"] + expected, atol=1e-9)
    assert out["count"] == 7 and info["clipped"] == 1 and info["sites"] == 2


@pytest.mark.parametrize("n", [2, 5])
def test_noise_is_calibrated_on_the_sum_whatever_the_number_of_replies(n):
    """std of (noised mean - clean mean) * n is sigma * C for any n: a round with fewer replies than
    planned is not under-noised (Flower's wrapper fixes sigma C / num_sampled_clients instead)."""
    sigma, clip = 0.8, 0.5
    dp = CentralDP(noise_multiplier=sigma, clipping_norm=clip, delta=1e-5)
    big = {"w": np.zeros(20_000, np.float32)}
    out, _ = dp.release([{"w": np.zeros(20_000, np.float32)}] * n, big)
    assert np.std(out["w"] * n) == pytest.approx(sigma * clip, rel=0.03)


def test_noise_is_secret_not_from_the_seeded_global_generator():
    """Two servers seeded alike (np.random.seed, what a seeded run or a resume restores) draw different noise."""
    draws = []
    for _ in range(2):
        np.random.seed(0)
        out, _ = CentralDP(1.0, 1.0, 1e-5).release([update(0.0)], CURRENT)
        draws.append(out["w"])
    assert not np.allclose(draws[0], draws[1])


def test_epsilon_composes_over_rounds_and_survives_a_restore():
    dp = CentralDP(noise_multiplier=1.2, clipping_norm=1.0, delta=1e-5)
    for _ in range(3):
        dp.release([update(0.1), update(0.2)], CURRENT)
    later = CentralDP(noise_multiplier=1.2, clipping_norm=1.0, delta=1e-5)
    later.load_state_dict(dp.state_dict())
    _, info = later.release([update(0.1)], CURRENT)
    ref = RDPAccountant()
    ref.history = [(1.2, 1.0, 4)]
    assert info["releases"] == 4 and info["epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert later.planned_epsilon(0) == pytest.approx(info["epsilon"])


def test_configs_it_cannot_honour_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="privacy.central_dp_noise_multiplier"):
        config("privacy.central_dp=true", "privacy.central_dp_clipping_norm=1.0")
    for strategy in ("scaffold", "krum", "fedmedian"):
        with pytest.raises(ConfigError, match="federation.strategy"):
            check_central_dp(config("privacy.central_dp=true", "privacy.central_dp_noise_multiplier=1.0",
                                    "privacy.central_dp_clipping_norm=1.0", f"federation.strategy={strategy}"))
    check_central_dp(config("privacy.central_dp=true", "privacy.central_dp_noise_multiplier=1.0",
                            "privacy.central_dp_clipping_norm=1.0", "federation.strategy=fedadam"))


CDP = ("federation.rounds=4", "federation.strategy=fedavgm", "federation.server_momentum=0.5",
       "privacy.central_dp=true", "privacy.central_dp_noise_multiplier=1.0", "privacy.central_dp_clipping_norm=0.05")


def test_a_federation_records_central_dp_and_a_resume_continues_its_account(tmp_path):
    """Each aggregated round records the release (epsilon rising with the rounds); a run killed in
    round 3 and resumed ends with the epsilon of 4 releases, not of the 2 after the restart."""
    run = tmp_path / "run"
    crash = FakeTransport(sites(3), crash=lambda i: i.message_type == TRAIN and i.config["server-round"] == 3)
    with pytest.raises(Crash):
        run_federation(crash, config(*CDP), run)
    assert len(load_latest(run).strategy_state["central_dp"]["history"]) == 2
    run_federation(FakeTransport(sites(3)), config(*CDP), run, resume=True)
    rounds = [r for r in read_rounds_file(run / "rounds.jsonl").strict() if r["round"] > 0]
    cdp = [r["train"]["central_dp"] for r in rounds]
    assert [c["releases"] for c in cdp] == [1, 2, 3, 4] and all(c["sites"] == 3 for c in cdp)
    eps = [c["epsilon"] for c in cdp]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    ref = RDPAccountant()
    ref.history = [(1.0, 1.0, 4)]
    assert eps[-1] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    md = (write_report([run]).parent / "report.md").read_text()
    assert "Central DP at the server" in md and f"{eps[-1]:.3f}" in md
