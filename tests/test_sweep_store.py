"""A sweep's shared work kept in MLflow, so that a re-run (after a crash, say) reads it instead of computing it again."""

import math

from permanence.adapters.sweep_store import SweepStore


def test_shared_probe_baselines_and_versions_0_read_back_as_logged(tmp_path):
    store = SweepStore("kept", tmp_path / "mlruns")
    parent = store.open_parent({"name": "kept", "timelines": []}, {})
    fields = {0: {"p_asr_clean": 0.25, "reactivated_asr_clean": 0.0}, 5: {"p_asr_clean": 0.5,
                                                                         "reactivated_asr_clean": math.nan}}
    assert store.finished_probe_baseline("k1") is None
    store.log_probe_baseline("k1", parent, fields, 1.5, "test")
    again = SweepStore("kept", tmp_path / "mlruns").finished_probe_baseline("k1")
    assert again.keys() == fields.keys() and again[0] == fields[0]
    assert again[5]["p_asr_clean"] == 0.5 and math.isnan(again[5]["reactivated_asr_clean"])
    assert store.finished_probe_baseline("k2") is None

    record = {"version": 0, "drift": 0.0, "poisoned": True, "clean_acc": 0.9, "asr": 1.0, "ra": 0.0,
              "train_seconds": 2.0, "eval_seconds": 0.1, "n_train": 898, "n_poisoned": 89, "updated": True,
              "p_asr": 0.99, "p_asr_clean": 0.01, "reactivated_asr": None, "reactivated_asr_clean": None,
              "bec": 1.0, "probe_seconds": 3.0}
    assert store.finished_m0_record("r1") is None
    store.log_m0_record("r1", parent, record, "test")
    assert store.finished_m0_record("r1") == record
    assert store.finished_m0_record("k1") is None, "each kind of shared work has its own key"
    roles = sorted(r.data.tags["permanence.role"] for r in store.client.search_runs([store.experiment_id]))
    assert roles == ["probe-baseline", "sweep", "version0"]
