"""SOLF stage B: robust fit, the epsilon rule, the 2-of-3 vote, priors and actions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from custom.labels import IGNORE_LABEL
from custom.solf import cohort


def table(values: dict[str, list[float]], organ_id: int = 5, organ: str = "liver") -> pd.DataFrame:
    n = len(values["norm_volume"])
    return pd.DataFrame({"volume": [f"v{i:02d}" for i in range(n)], "organ_id": organ_id, "organ": organ,
                         "volume_ml": [1500.0] * n, **values})


def cohort_of_20(**override: tuple[float, float, float]) -> pd.DataFrame:
    """20 masks with features spread 1 unit around (10, 0.6, 0.9) x scale; ``v00..`` rows overridden."""
    base = np.linspace(-1, 1, 20)
    vals = {"norm_volume": list(0.10 + 0.01 * base), "sphericity": list(0.60 + 0.02 * base), "eccentricity": list(0.90 + 0.01 * base)}
    for i, (name, triple) in enumerate(override.items()):
        for f, v in zip(cohort.FEATURES, triple):
            vals[f][i] = v
    return table(vals)


def test_robust_fit_median_and_scaled_mad() -> None:
    t = table({"norm_volume": [1, 2, 3, 4, 100.0], "sphericity": [0.5] * 5, "eccentricity": [0.1, 0.2, 0.3, 0.4, 0.5]})
    thr = cohort.fit(t, eps=2, min_samples=5).iloc[0]
    assert thr["norm_volume_median"] == 3.0
    assert thr["norm_volume_sd"] == pytest.approx(1.4826 * 1.0)  # MAD of |x - 3| = (2,1,0,1,97) -> 1
    assert thr["norm_volume_hi"] == pytest.approx(3 + 2 * 1.4826)
    assert thr["eccentricity_lo"] == pytest.approx(0.3 - 2 * 1.4826 * 0.1)
    assert bool(thr["fitted"])


def test_two_of_three_rule() -> None:
    t = cohort_of_20(
        one=(0.125, 0.60, 0.90),  # volume only (3.1 robust SDs, under 3 bands): an outlier on one feature, kept
        two=(0.5, 0.30, 0.90),  # volume and sphericity: rejected
        three=(0.5, 0.30, 0.50),  # all three: rejected
    )
    dec = cohort.decide(t, cohort.fit(t)).set_index("volume")
    assert dec.loc["v00", "outliers"] == 1 and not dec.loc["v00", "rejected"] and dec.loc["v00", "action"] == "keep"
    assert dec.loc["v01", "outliers"] == 2 and dec.loc["v01", "rejected"] and dec.loc["v01", "action"] == "ignore"
    assert dec.loc["v02", "outliers"] == 3 and dec.loc["v02", "rejected"]
    assert dec["rejected"].sum() == 2
    assert list(dec.reset_index().columns[:9]) == cohort.DECISION_COLUMNS
    # a larger epsilon keeps everything; a 1-of-3 vote rejects the volume-only outlier too
    assert cohort.decide(t, cohort.fit(t, eps=100))["rejected"].sum() == 0
    assert cohort.decide(t, cohort.fit(t), min_votes=1)["rejected"].sum() == 3


def test_a_gross_volume_rejects_a_whole_mask_alone_but_not_a_cut_one() -> None:
    # robust SD of the volumes 0.0078: eps 2 -> band 0.0156, 3 bands 0.0468 (6 robust SDs)
    t = cohort_of_20(small=(0.05, 0.60, 0.90), edge=(0.14, 0.60, 0.90))  # 6.5 and 5.0 robust SDs, shapes normal
    dec = cohort.decide(t, cohort.fit(t)).set_index("volume")
    assert dec.loc["v00", "outliers"] == 1 and dec.loc["v00", "gross_volume"] and dec.loc["v00", "rejected"]
    assert dec.loc["v01", "outliers"] == 1 and not dec.loc["v01", "gross_volume"] and not dec.loc["v01", "rejected"]
    assert dec["rejected"].sum() == 1
    # the band scales with eps (eps 3: 9 robust SDs), inf is the paper's 2-of-3 vote alone
    assert cohort.decide(t, cohort.fit(t, eps=3))["rejected"].sum() == 0
    assert cohort.decide(t, cohort.fit(t), gross_volume_bands=float("inf"))["rejected"].sum() == 0
    # a cut organ is smaller than a whole one by nature: judged by its votes only
    cut = _whole_and_cut(20)
    cut.loc[cut.index[cut["volume"] == "pv03"][0], "norm_volume"] = 0.001
    dec = cohort.decide(cut, cohort.fit(cut)).set_index("volume")
    assert not dec.loc["pv03", "gross_volume"] and dec.loc["pv03", "outliers"] == 1 and not dec["rejected"].any()


def test_small_cohorts_are_never_rejected_and_priors_add_a_third_stage() -> None:
    t = cohort_of_20(two=(0.5, 0.30, 0.90))
    assert cohort.decide(t, cohort.fit(t, min_samples=50))["rejected"].sum() == 0
    t.loc[5, "volume_ml"] = 4000.0  # a 4 L liver with normal shape features: only the prior catches it
    assert cohort.decide(t, cohort.fit(t))["rejected"].sum() == 1
    dec = cohort.decide(t, cohort.fit(t), use_priors=True)
    assert dec["rejected"].sum() == 2 and bool(dec.loc[5, "prior_violation"])


def test_actions_ignore_background_drop() -> None:
    labels = np.array([[[0, 1, 2, 5]]], dtype=np.uint8)
    np.testing.assert_array_equal(cohort.apply_actions(labels, {5: "ignore", 2: "background"}), [[[0, 1, 0, IGNORE_LABEL]]])
    np.testing.assert_array_equal(cohort.apply_actions(labels, {}), labels)
    t = cohort_of_20(two=(0.5, 0.30, 0.90))
    dec = cohort.decide(t, cohort.fit(t), action="drop", max_rejected=0)
    assert set(dec.loc[dec["action"] == "drop", "volume"]) == {"v00"} == cohort.dropped_volumes(dec)
    datalist = [{"label": "/data/v00"}, {"label": "/data/v01"}]
    assert cohort.keep_volumes(datalist, dec) == [{"label": "/data/v01"}]
    with pytest.raises(ValueError, match="action"):
        cohort.decide(t, cohort.fit(t), action="delete")


def test_apply_decision_transform_looks_up_the_volume_by_path(tmp_path) -> None:
    import torch
    from monai.data import MetaTensor

    from custom.solf.transforms import ApplySOLFDecisiond

    dec = pd.DataFrame({"volume": ["labels/a.nii.gz", "labels/a.nii.gz", "labels/b.nii.gz"], "organ_id": [1, 5, 1],
                        "organ": ["spleen", "liver", "spleen"], "norm_volume": 0.1, "sphericity": 0.5, "eccentricity": 0.9,
                        "outliers": [0, 2, 0], "rejected": [False, True, False], "action": ["keep", "ignore", "keep"]})
    dec.to_csv(tmp_path / "decisions.csv", index=False)
    t = ApplySOLFDecisiond(["label"], str(tmp_path / "decisions.csv"))
    lab = MetaTensor(torch.tensor([[[[0.0, 1.0, 5.0]]]]), meta={"filename_or_obj": "/data/set/labels/a.nii.gz"})
    out = t({"label": lab})["label"]
    assert out.flatten().tolist() == [0, 1, IGNORE_LABEL] and isinstance(out, MetaTensor)
    lab_b = MetaTensor(torch.tensor([[[[0.0, 1.0, 5.0]]]]), meta={"filename_or_obj": "/data/set/labels/b.nii.gz"})
    assert t({"label": lab_b})["label"].flatten().tolist() == [0, 1, 5]
    with pytest.raises(KeyError, match="not in the SOLF decisions"):
        t({"label": MetaTensor(torch.zeros(1, 1, 1, 1), meta={"filename_or_obj": "/x/c.nii.gz"})})


def test_partial_masks_are_fitted_apart_and_judged_only_against_partial_ones() -> None:
    """An organ cut by the field of view (stage A's ``partial``) is never compared with whole organs."""
    t = cohort_of_20()
    t["partial"] = False
    cut = cohort_of_20().assign(volume=lambda x: "p" + x["volume"], partial=True)
    cut[["norm_volume", "sphericity"]] = cut[["norm_volume", "sphericity"]] * 0.5  # cut in half, flatter
    both = pd.concat([t, cut], ignore_index=True)
    thr = cohort.fit(both)
    assert thr["partial"].tolist() == [False, True] and thr["n"].tolist() == [20, 20]
    whole = thr[~thr["partial"]].iloc[0]
    assert whole["norm_volume_median"] == pytest.approx(0.10) and whole["norm_volume_hi"] == pytest.approx(0.10 + 2 * whole["norm_volume_sd"])
    part = thr[thr["partial"]].iloc[0]  # the wider band: partial_eps robust SDs
    assert part["norm_volume_hi"] - part["norm_volume_median"] == pytest.approx(cohort.DEFAULT_PARTIAL_EPS * part["norm_volume_sd"])
    dec = cohort.decide(both, thr)
    assert dec["rejected"].sum() == 0 and dec["partial"].sum() == 20  # half organs: normal among cut ones
    # judged against the whole organs' band instead, every half organ would be rejected
    assert ((cut["norm_volume"] < whole["norm_volume_lo"]) & (cut["sphericity"] < whole["sphericity_lo"])).all()
    gross = both.copy()
    gross.loc[25, ["norm_volume", "sphericity"]] = (0.5, 0.1)  # a cut organ grossly wrong even among cut ones
    dec = cohort.decide(gross, cohort.fit(gross)).set_index("volume")
    assert dec.loc["pv05", "rejected"] and dec["rejected"].sum() == 1
    never = cohort.decide(gross, cohort.fit(gross, partial_eps=float("inf")))
    assert never["rejected"].sum() == 0 and not never.loc[never["partial"], "outliers"].any()
    # a table from before the flag (no column) is all whole, as before
    assert "partial" not in cohort_of_20() and not cohort.fit(cohort_of_20())["partial"].any()


def _whole_and_cut(n_cut: int) -> pd.DataFrame:
    """20 whole liver masks (1400-1600 mL) and ``n_cut`` masks cut in half by the field of view."""
    whole = cohort_of_20().assign(partial=False, volume_ml=np.linspace(1400.0, 1600.0, 20))
    cut = cohort_of_20().assign(volume=lambda x: "p" + x["volume"], partial=True, volume_ml=np.linspace(700.0, 800.0, 20))
    cut[["norm_volume", "sphericity"]] = cut[["norm_volume", "sphericity"]] * 0.5
    return pd.concat([whole, cut.iloc[:n_cut]], ignore_index=True)


def test_rarely_cut_organ_judges_its_partial_masks_against_whole_ones() -> None:
    """Too few partial masks to fit (here 2): the cohort says the organ is whole, so a cut one is judged as whole."""
    t = _whole_and_cut(2)
    thr = cohort.fit(t).set_index("partial")
    assert thr.loc[True, "fitted_on"] == "whole" and bool(thr.loc[True, "fitted"]) and thr.loc[True, "n"] == 2
    assert thr.loc[True, "norm_volume_lo"] == pytest.approx(thr.loc[False, "norm_volume_lo"])
    dec = cohort.decide(t, cohort.fit(t)).set_index("volume")
    assert dec.loc[["pv00", "pv01"], "rejected"].all() and not dec.loc[~dec["partial"], "rejected"].any()
    # with enough partial masks they are their own reference again, and half organs are normal there
    many = cohort.fit(_whole_and_cut(20)).set_index("partial")
    assert many.loc[True, "fitted_on"] == "partial"
    assert not cohort.decide(_whole_and_cut(20), cohort.fit(_whole_and_cut(20)))["rejected"].any()


def test_partial_mask_larger_than_a_whole_organ_gets_one_more_vote() -> None:
    t = _whole_and_cut(20)
    thr = cohort.fit(t).set_index("partial")
    sd = 1.4826 * np.median(np.abs(np.linspace(1400.0, 1600.0, 20) - 1500.0))
    assert thr.loc[True, "volume_ml_hi"] == pytest.approx(1500.0 + cohort.PARTIAL_VOLUME_SDS * sd)
    grown = t.copy()
    i = grown.index[grown["volume"] == "pv03"][0]
    grown.loc[i, "volume_ml"] = 2500.0  # a spill that reaches the border: more mL than any whole liver ...
    grown.loc[i, "eccentricity"] = 2.0  # ... and one shape feature out: 2 votes
    dec = cohort.decide(grown, cohort.fit(grown)).set_index("volume")
    assert dec.loc["pv03", "partial_too_large"] and dec.loc["pv03", "outliers"] == 2 and dec.loc["pv03", "rejected"]
    assert dec["rejected"].sum() == 1
    grown.loc[i, "volume_ml"] = 790.0  # the same shape outlier at a cut organ's volume: one vote, kept
    dec = cohort.decide(grown, cohort.fit(grown)).set_index("volume")
    assert not dec.loc["pv03", "partial_too_large"] and dec.loc["pv03", "outliers"] == 1 and not dec["rejected"].any()
