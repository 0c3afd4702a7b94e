"""`gclip bench` on the tiny model: the JSON record has every field, the Markdown log is appended."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import HERE, TINY, tiny_second_models
from gclip.cli import main
from gclip.diagnostics.bench import BenchConfig, encoder_flops, memory_check_subprocess, window_grids

STAGES = {"decode", "preprocess", "masks", "encoder", "second_model", "head", "text"}
TOP_FIELDS = {
    "images", "count", "model", "weights", "method", "method_options", "precision", "device", "batch_size",
    "batch_images", "compile", "settings", "classes", "windows", "images_per_s", "seconds", "latency_ms",
    "stage_seconds", "text_cache_hits", "encoder_gflop", "encoder_tflops_per_s", "peak_rss_mb", "cuda_peak_mb",
    "reference", "machine", "command", "date", "workers", "staged", "pipelined", "pipelined_labels_identical",
    "text",
}  # fmt: skip
REFERENCE_FIELDS = {
    "count", "images_per_s", "latency_ms", "peak_rss_mb", "cuda_peak_mb", "labels_identical", "mismatched_images",
    "mismatched_pixels",
}  # fmt: skip
MACHINE_FIELDS = {"cpu", "cpu_cores", "gpu", "python", "torch", "open_clip", "gclip"}


def test_bench_smoke_writes_json_with_every_field(tmp_path, capsys):
    out, log = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    argv = ["bench", "--model", TINY, "--random-weights", "--synthetic", "70x50", "--count", "3", "--method", "gclip"]
    argv += ["--crop", "32", "--stride", "16", "--short-side", "48", "--batch-images", "2", "--batch-size", "4"]
    assert main(argv + ["--json", str(out), "--results", str(log)]) == 0
    record = json.loads(out.read_text())
    assert TOP_FIELDS <= set(record)
    assert set(record["stage_seconds"]) == STAGES
    assert all(v >= 0 for v in record["stage_seconds"].values()) and record["stage_seconds"]["encoder"] > 0
    assert set(record["latency_ms"]) == {"p50", "p95"} and record["latency_ms"]["p95"] >= record["latency_ms"]["p50"]
    assert REFERENCE_FIELDS <= set(record["reference"]) and MACHINE_FIELDS <= set(record["machine"])
    assert record["count"] == 3 and record["images_per_s"] > 0 and record["peak_rss_mb"] > 0
    assert record["encoder_tflops_per_s"] > 0 and record["classes"] == 21
    assert record["reference"]["labels_identical"] is True and record["reference"]["mismatched_pixels"] == 0
    assert record["stage_seconds"]["second_model"] < 0.05  # gclip has none (the stage only times the hook)
    assert record["command"].startswith("gclip bench ") and "--random-weights" in record["command"]
    # 70x50 -> 67x48 after the resize: windows of 32, stride 16 -> 2 rows x 4 columns per image
    assert record["windows"] == 3 * 8
    text = log.read_text()
    assert text.startswith("# Benchmark results") and record["command"] in text and "speed-up" in text
    printed = capsys.readouterr().out
    assert "labels identical: yes" in printed
    text_stage = record["text"]  # classes per second of the text encoding (issue 24, 4)
    assert (text_stage["classes"], text_stage["queries"], text_stage["templates"]) == (21, 21, 80)
    assert text_stage["classes_per_s"] == pytest.approx(21 / text_stage["seconds"], rel=1e-3)
    assert text_stage["seconds"] == record["stage_seconds"]["text"]
    assert f"text: 21 classes (21 prompts x 80 templates) in {text_stage['seconds']:.3f} s" in printed
    assert "classes/s" in printed and "classes/s" in text
    assert main(argv + ["--json", str(out), "--results", str(log), "--no-reference"]) == 0
    assert json.loads(out.read_text())["reference"] is None
    assert log.read_text().count("### ") == 2
    assert record["workers"] == 0 and record["pipelined"] is None and record["staged"]["count"] == 3


def test_bench_without_the_sample_says_so_before_loading_the_model(tmp_path, monkeypatch):
    """`--images sample` (the default) needs the developers' sample: a one-line error, and no model load."""
    from gclip.diagnostics.bench import config as bench_config
    from gclip.diagnostics.bench import run as bench_run
    from gclip.errors import ConfigError

    def absent(root=None):
        raise ConfigError("the real sample (../shared/data or $GCLIP_SAMPLE_DATA) is not here")

    def no_load(config):
        raise AssertionError("the model was loaded before the images were found")

    monkeypatch.setattr(bench_config, "sample_images", absent)
    monkeypatch.setattr(bench_run, "build_segmenter", no_load)
    with pytest.raises(ConfigError, match="sample"):
        bench_run.run_bench(BenchConfig(model=TINY, random_weights=True))


def test_bench_on_the_bundled_example_photos(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", TINY, "--random-weights", "--images", "examples", "--count", "2", "--no-reference"]
    assert main(argv + ["--crop", "32", "--stride", "16", "--short-side", "48", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["count"] == 2 and "examples" in record["images"]


def test_bench_pipelined_pass_runs_the_local_engine_with_workers(tmp_path, capsys):
    """With decoding workers the headline is the `gclip segment` path; its labels equal the staged pass's."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", TINY, "--random-weights", "--synthetic", "70x50", "--count", "5", "--workers", "2"]
    argv += ["--crop", "32", "--stride", "16", "--short-side", "48", "--batch-images", "2", "--no-record"]
    assert main(argv + ["--json", str(out)]) == 0
    record = json.loads(out.read_text())
    pipelined = record["pipelined"]
    assert record["workers"] == 2 and pipelined["workers"] == 2 and pipelined["count"] == 5
    assert record["images_per_s"] == pipelined["images_per_s"] and pipelined["seconds"] > 0
    assert record["staged"]["count"] == 5 and record["staged"]["images_per_s"] > 0
    assert record["pipelined_labels_identical"] is True
    assert record["reference"]["labels_identical"] is True and record["reference"]["count"] == 5
    assert "pipelined with 2 decoding worker(s)" in capsys.readouterr().out
    assert main(argv + ["--json", str(out), "--workers", "-1"]) == 2


def test_bench_writes_a_markdown_log_only_when_asked(tmp_path, monkeypatch, capsys):
    """Issue 24 (10): `gclip bench` run from any folder leaves no benchmarks/RESULTS.md there unless --results."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", TINY, "--random-weights", "--synthetic", "40x40", "--count", "1", "--no-reference"]
    argv += ["--crop", "32", "--stride", "16", "--short-side", "32", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"] and "appended" not in capsys.readouterr().out
    assert main(argv + ["--results", "log.md"]) == 0
    assert (tmp_path / "log.md").read_text().startswith("# Benchmark results")


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--model", TINY, "--random-weights", "--images", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--synthetic", "big"])


def test_encoder_flops_formula(tiny_model):
    from gclip.backbones.openclip import DenseViT

    vit = DenseViT(tiny_model.visual)
    d, p, layers = vit.width, vit.patch_size, vit.depth - 1
    n = 1 + 4 * 4
    expected = 2 * 16 * 3 * p * p * d + layers * (8 * n * d * d + 4 * n * n * d + 4 * n * d * 4 * d)
    assert encoder_flops(vit, (4, 4)) == expected
    assert window_grids((48, 67), 32, 16, p, "symmetric") == [(4, 4)] * 8
    assert window_grids((20, 21), 0, 16, p, "symmetric") == [(3, 3)]


@pytest.mark.heavy
def test_memory_check_runs_in_a_fresh_process():
    config = BenchConfig(model=TINY, model_configs=[str(HERE / "configs")], settings={"crop": 64, "stride": 32})
    record = memory_check_subprocess(config, size=(90, 120), classes="voc21", timeout=300)
    assert record["labels_shape"] == [90, 120] and record["classes"] == 21
    assert record["peak_rss_mb"] > 0 and record["naive_canvas_mb"] == pytest.approx(21 * 90 * 120 * 4 / 2**20)


@pytest.mark.parametrize("method", ["proxyclip", "trident", "corrclip"])
def test_bench_times_the_second_model_as_its_own_stage(tmp_path, method):
    options = tiny_second_models(method)  # corrclip: synthetic images have no mask files, SAM's generator makes
    if method == "corrclip":  # them (its own stage)
        options["window_pad"] = 8
    extra = ["--method-options", json.dumps(options)]
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        TINY,
        "--random-weights",
        "--synthetic",
        "70x50",
        "--count",
        "2",
        "--method",
        method,
    ]
    argv += ["--crop", "32", "--stride", "16", "--short-side", "48", "--no-reference", "--no-record", *extra]
    assert main(argv + ["--json", str(out)]) == 0
    stages = json.loads(out.read_text())["stage_seconds"]
    assert stages["second_model"] > 0 and stages["head"] > 0
    assert (stages["masks"] > 0) == (method == "corrclip")


def test_bench_finds_a_masks_folder_by_the_images_names(tmp_path):
    """A method reading pre-generated masks (TextRegion's ``--masks FOLDER``) finds each image's ``<stem>.npz`` in
    the staged pass and in the reference loop (the staged pass once keyed images by their index: no mask found)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{stem}.jpg")
        masks = np.zeros((2, 50, 70), np.float32)
        masks[0, :25], masks[1, 25:] = 1.0, 1.0
        np.savez(tmp_path / "masks" / f"{stem}.npz", region_masks=masks)
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", TINY, "--random-weights", "--images", str(tmp_path / "images"), "--count", "2"]
    argv += ["--method", "textregion", "--masks", str(tmp_path / "masks"), "--short-side", "48"]
    argv += ["--method-options", json.dumps({"crop_size": 32}), "--reference-count", "2", "--no-record"]
    assert main(argv + ["--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["count"] == 2 and record["reference"]["labels_identical"] is True
