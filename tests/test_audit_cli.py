"""The causal audit through the evaluation CLI on the tiny synthetic split: every ablation at once."""

import json

import numpy as np
import pytest
from test_evaluate import _common, _read, workspace  # noqa: F401  (workspace: the module fixture)

from experiments.evaluate import main
from ivtlr_jax.eval.audit import ABLATIONS


def test_cli_runs_every_ablation_paired_with_the_intact_run(workspace):  # noqa: F811
    root, _ = workspace
    out, plain = root / "audit", root / "audit_plain"
    summary = main(_common(root, out, "--ablate", ",".join(ABLATIONS)))
    main(_common(root, plain))
    for name in ("predictions.jsonl", "summary.json", "summary.md", "ablations.png"):
        assert (out / name).is_file(), name
    rows, saved = _read(out)
    rows_plain, _ = _read(plain)
    assert [r["generated"] for r in rows] == [r["generated"] for r in rows_plain]  # the intact run is unchanged
    assert list(saved["ablations"]) == list(ABLATIONS) and saved["ablations"] == summary["ablations"]
    for name, a in saved["ablations"].items():
        assert set(a) == {"accuracy", "delta", "ci95", "p_value", "changed"}, name
        assert a["delta"] == pytest.approx(a["accuracy"] - saved["accuracy"])
        assert a["ci95"][0] <= a["delta"] + 1e-12 and a["delta"] <= a["ci95"][1] + 1e-12
        assert 0 <= a["p_value"] <= 1 and 0 <= a["changed"] <= 1
        assert np.isclose(a["accuracy"] * 6, round(a["accuracy"] * 6))  # a share of the same 6 rows
    med = saved["mediation"]
    assert [m["step"] for m in med] == [0, 1, 2]
    assert all(-1 - 1e-6 <= m["cosine_image_blank"] <= 1 + 1e-6 for m in med)
    assert med[0]["cosine_image_blank"] < 1 - 1e-6  # the blank image changes the prefix's last state
    for name in ("latent-zero", "latent-noise", "latent-shuffle"):  # step 0 selects from the untouched prefix
        assert med[0]["overlap_with_intact"][name] == 1.0
    assert med[0]["overlap_with_intact"]["select-bottom"] == 0.0  # the least attended, not the most
    assert med[0]["overlap_with_intact"]["select-random"] < 1.0
    assert all(m["overlap_other_steps"]["latent-zero"] >= 0 for m in med)
    text = (out / "summary.md").read_text()
    assert "Causal audit" in text and all(f"| {name} |" in text for name in ABLATIONS)
    assert json.loads((out / "summary.json").read_text())["mediation"] == med


def test_cli_refuses_an_unknown_ablation(workspace):  # noqa: F811
    root, _ = workspace
    with pytest.raises(ValueError, match="unknown"):
        main(_common(root, root / "bad_ablate", "--ablate", "latent-zero,image-flip"))
