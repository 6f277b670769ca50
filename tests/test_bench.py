"""Smoke tests of the benchmark harness bench/performance.py (and its modules) on the quickstart preset.

The figures themselves are measured on a quiet machine (README, `make bench`); these tests
check that one tiny run produces finite, positive numbers and records nothing it is told not
to, and that the FLOP count behaves as a count of the network's work must.
"""

from __future__ import annotations

import json
import math

import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
]

TINY_RUN = ["--presets", "digits_quickstart", "--batch", "4", "--warmup", "1", "--steps", "2",
            "--sampler", "ddim10", "--sample-batch", "2", "--loader-batches", "2"]


@pytest.fixture
def performance(monkeypatch, tmp_path):
    """bench/performance.py (bench/ is on pytest's pythonpath), with its results file in
    tmp_path, a device peak from tiny matmuls and convolutions (the plumbing is under test,
    not the figure), and Lightning's logging left as the other tests expect it."""
    monkeypatch.chdir(REPO)
    import device_peak
    import performance

    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results.md")
    monkeypatch.setitem(device_peak.MATMUL_SIZES, "cpu", (64,))
    monkeypatch.setitem(device_peak.CONV_SHAPES, "cpu", ((2, 8, 8, 8),))
    monkeypatch.setitem(device_peak.TIMING_SECONDS, "cpu", 0.01)
    monkeypatch.setattr(performance, "quiet", lambda: None)  # keeps the global logging levels
    yield performance
    GlobalHydra.instance().clear()


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_tiny_run_reports_finite_figures_and_records_only_when_asked(performance, tmp_path):
    results = REPO / "bench" / "results.md"
    before = results.read_bytes()
    (report,) = performance.main([*TINY_RUN, "--ablate", "grad_checkpoint", "--repeats", "1", "--no-record"])
    assert results.read_bytes() == before and not (tmp_path / "results.md").exists()

    run = report["train"]
    for value in (run.images_per_s, run.step_s, run.forward_s, run.backward_s, run.flops_per_image,
                  run.achieved, run.peak_memory, run.saved_bytes, report["conv"].flops_per_s,
                  report["matmul"].flops_per_s, report["sampling"][0], report["loader"][0]):
        assert positive(value)
    assert 0.0 <= run.share_outside <= 1.0
    assert run.forward_s + run.backward_s <= run.step_s
    (ablation,) = report["ablations"]
    assert positive(ablation.ratio)
    # Checkpointing keeps only block inputs: far fewer bytes saved for backward.
    assert ablation.variant.saved_bytes < ablation.baseline.saved_bytes

    from performance_report import record_rows

    record_rows(report)  # into tmp_path (the fixture), never bench/results.md
    text = (tmp_path / "results.md").read_text()
    for table in ("Training performance (MFU harness)", "Ablations", "Sampling throughput", "Data loading"):
        assert f"## {table}" in text
    assert text.count("bench/performance.py --presets digits_quickstart") == 3
    assert results.read_bytes() == before


def test_flop_count_is_linear_in_the_batch_and_exceeds_two_flops_per_parameter(performance, tmp_path):
    import hydra
    from step_costs import flops_per_image

    from diffusion.training.run import build_module

    from common import compose_preset

    cfg = compose_preset("digits_quickstart", [], str(tmp_path / "run"))
    module = build_module(cfg, hydra.utils.instantiate(cfg.data))
    per_image = [flops_per_image(module, batch) for batch in (1, 2, 5)]
    assert per_image[0] == per_image[1] == per_image[2]  # total FLOPs exactly linear in the batch
    params = sum(p.numel() for p in module.model.parameters())
    # A forward alone costs 2 FLOPs per weight per use, and every weight is used at least once.
    assert per_image[0] > 2 * params


def test_peaks_from_an_earlier_json_are_reused_not_measured_again(performance, tmp_path, monkeypatch):
    first = tmp_path / "first.json"
    (report,) = performance.main([*TINY_RUN, "--skip", "sampling,data", "--no-record", "--json", str(first)])

    def measured_again(*args, **kwargs):
        raise AssertionError("--peaks-from must not measure the peaks again")

    monkeypatch.setattr(performance, "conv_peak", measured_again)
    monkeypatch.setattr(performance, "matmul_peak", measured_again)
    (again,) = performance.main([*TINY_RUN, "--skip", "sampling,data", "--no-record", "--peaks-from", str(first)])
    assert again["conv"] == report["conv"] and again["matmul"] == report["matmul"]


def test_json_keeps_the_training_figures_when_a_later_part_fails(performance, tmp_path, monkeypatch):
    """bench/gpu_check.sh's compiled stage may run out of time while sampling: the figures
    measured before that must already be in --json (written atomically after each part)."""
    def sampling_dies(*args, **kwargs):
        raise KeyboardInterrupt("the stage's time limit")

    monkeypatch.setattr(performance, "sampling_rate", sampling_dies)
    path = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        performance.main([*TINY_RUN, "--skip", "data", "--no-record", "--json", str(path)])
    (report,) = json.loads(path.read_text())
    assert report["preset"] == "digits_quickstart" and report["sampling"] is None
    assert positive(report["train"]["images_per_s"]) and positive(report["train"]["mfu_vs_conv"])
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left beside it


def test_step_profile_reports_each_variant_and_the_profile(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    import performance
    import step_profile

    monkeypatch.setattr(step_profile, "quiet", lambda: None)
    monkeypatch.setattr(performance, "quiet", lambda: None)
    step_profile.main(["--preset", "digits_quickstart", "--device", "cpu", "--override", "data.batch_size=4",
                       "--variant", "nchw=model.channels_last=false", "--variant", "bad=model.no_such_key=1",
                       "--warmup", "1", "--steps", "2", "--profile-steps", "1", "--rows", "5"])
    GlobalHydra.instance().clear()
    out = capsys.readouterr().out
    assert "base:" in out and "(x1.00)" in out
    assert "nchw:" in out and "images/s" in out.split("nchw:")[1].splitlines()[0]
    assert "bad: failed: ConfigCompositionException" in out  # reported; the other runs went on
    assert "profiled 1 steps" in out and "Self CPU time total" in out


def test_sample_end_to_end_times_both_and_breaks_sample_py_down(tiny_ckpt, monkeypatch, tmp_path, capsys):
    """bench/sample_end_to_end.py on a tiny checkpoint: one pair, one stamped run, a row in the
    results file; the stages of the stamped run add up to its wall time."""
    import sample_end_to_end

    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results.md")
    monkeypatch.setattr("sys.argv", ["sample_end_to_end.py", "--ckpt", tiny_ckpt, "--sampler", "ddim10",
                                     "--num-samples", "4", "--batch", "2", "--repeats", "1", "--threads", "1"])
    sample_end_to_end.main()
    out = capsys.readouterr().out
    assert "repeat 1: sample.py" in out and "breakdown of sample.py" in out
    stages = [float(line.split()[-3]) for line in out.splitlines()
              if any(line.strip().startswith(name) for name in sample_end_to_end.STAGES)]
    total = float(out.split("stamped run(s) (")[1].split(" s)")[0])
    assert len(stages) == len(sample_end_to_end.STAGES) and math.isclose(sum(stages), total, rel_tol=0.02, abs_tol=0.03)
    row = (tmp_path / "results.md").read_text().splitlines()[-1]
    assert "| ddim10 | 4 | 2 |" in row


def test_cpu_targets_alternates_the_configs_between_peaks_and_records_every_figure(
        performance, tiny_ckpt, monkeypatch, tmp_path, capsys):
    """bench/cpu_targets.py with tiny UNets on the digits: two rounds in alternating order,
    each run divided by the higher of the peaks beside it, one row per figure."""
    import cpu_targets

    peaks = iter([1e9, 3e9, 2e9, 5e9, 4e9])  # before, between and after the runs of two rounds
    monkeypatch.setattr(cpu_targets, "conv_peak", lambda device, dtype: type("P", (), {"flops_per_s": next(peaks)}))
    monkeypatch.setattr(cpu_targets, "quiet", lambda: None)
    monkeypatch.setattr(cpu_targets, "PRESET", "digits_quickstart")
    monkeypatch.setattr(cpu_targets, "CONFIGS", {"small": (4, ["model.model_channels=32"]),
                                                 "smaller": (2, ["model.model_channels=32", "model.num_res_blocks=1"])})
    result = cpu_targets.main(["--rounds", "2", "--warmup", "1", "--steps", "2", "--ckpt", tiny_ckpt,
                               "--sampler", "ddim10", "--num-samples", "4", "--sample-batch", "2", "--pairs", "1",
                               "--json", str(tmp_path / "targets.json")])
    small, smaller = (result["training"]["configs"][name]["runs"] for name in ("small", "smaller"))
    assert [r["peak"] for r in small] == [3e9, 5e9] and [r["peak"] for r in smaller] == [3e9, 5e9]
    for run in small + smaller:
        assert positive(run["images_per_s"]) and math.isclose(run["mfu"], run["achieved"] / run["peak"])
    out = capsys.readouterr().out
    assert out.index("round 1: small") < out.index("round 1: smaller") and out.index("round 2: smaller") < out.index(
        "round 2: small,")  # the second round runs them in reverse
    assert 0 < result["sampling"]["ratio"] and len(result["sampling"]["pair_ratios"]) == 1
    assert json.loads((tmp_path / "targets.json").read_text())["training"]["peaks"] == [1e9, 3e9, 2e9, 5e9, 4e9]
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if "cpu_targets.py --rounds" in line]
    assert len(rows) == 3 and "| small | 4 |" in rows[0] and "sample.py ddim10" in rows[2]


def test_mfu_ceiling_frees_the_layers_only_inside_and_counts_the_same_flops(performance, monkeypatch, tmp_path, capsys):
    """bench/mfu_ceiling.py: inside ``free`` GroupNorm, SiLU and dropout are the identity, and
    restored after it, an exception included; a tiny run alternates the variants, counts the
    same FLOPs in both and records one row per configuration."""
    import mfu_ceiling
    import torch
    from torch import nn

    from diffusion.nets.blocks import Dropout, GroupNorm32

    x = torch.randn(2, 32, 4, 4)
    layers = (GroupNorm32(32, 32), nn.SiLU(), Dropout(0.5))
    with pytest.raises(RuntimeError, match="inside"), mfu_ceiling.free(sorted(mfu_ceiling.FREE_LAYERS)):
        assert all(layer(x) is x for layer in layers)
        raise RuntimeError("inside")
    assert not any(torch.equal(layer(x), x) for layer in layers)

    peaks = iter([1e9, 3e9, 2e9, 5e9, 4e9])
    monkeypatch.setattr(mfu_ceiling.cpu_targets, "conv_peak", lambda device, dtype: type("P", (), {"flops_per_s": next(peaks)}))
    monkeypatch.setattr(mfu_ceiling, "quiet", lambda: None)
    monkeypatch.setattr(mfu_ceiling.cpu_targets, "PRESET", "digits_quickstart")
    monkeypatch.setattr(mfu_ceiling.cpu_targets, "CONFIGS", {"small": (4, ["model.model_channels=32"])})
    summary = mfu_ceiling.main(["--rounds", "2", "--warmup", "1", "--steps", "2", "--configs", "0"])
    runs = summary["small"]["runs"]
    flops = {run["flops_per_image"] for variant in ("as is", "free") for run in runs[variant]}
    assert len(flops) == 1 and all(positive(run["mfu"]) for variant in runs.values() for run in variant)
    for variant in ("as is", "free"):  # each run against the higher of the peaks beside it
        achieved = [run["images_per_s"] * run["flops_per_image"] for run in runs[variant]]
        assert [a / run["mfu"] for a, run in zip(achieved, runs[variant], strict=True)] == pytest.approx([3e9, 5e9])
    out = capsys.readouterr().out
    assert out.index("round 1: small, as is") < out.index("round 1: small, free")
    assert out.index("round 2: small, free") < out.index("round 2: small, as is")  # reversed
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if "mfu_ceiling.py --rounds" in line]
    assert len(rows) == 1 and "| small | dropout, groupnorm, silu |" in rows[0]


def test_every_ablation_variant_composes_and_passes_the_config_checks(tmp_path):
    """Both sides of every --ablate variant are valid overrides of the CIFAR preset (a typo
    would only show on the GPU, mid-run)."""
    from ablations import VARIANTS

    from diffusion.training.config_checks import check_train_config

    from common import compose_preset

    for name, (on, off) in VARIANTS.items():
        for overrides in (on, off):
            check_train_config(compose_preset("cifar_cosine_learned_sigma", ["data=synthetic", *overrides],
                                              str(tmp_path / name)))
    GlobalHydra.instance().clear()
