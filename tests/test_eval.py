"""``gclip eval`` end to end: outputs, --dataset all, --skip-bad, predictions, and 2-process (gloo) == 1-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gclip.cli import main
from gclip.io.outputs import read_label_png
from test_datasets import write_layout

HERE = Path(__file__).parent
SRC = HERE.parent / "src"
TINY = "gclip-tiny-test"
FAST = ["--short-side", "32", "--crop", "32", "--stride", "16", "--workers", "0", "--quiet"]
ONE_TEMPLATE: list[str] = []  # set by the autouse fixture: text embedding with 80 templates dominates CPU tests


@pytest.fixture(autouse=True, scope="module")
def one_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "one.txt"
    path.write_text("a photo of a {c}.\n")
    ONE_TEMPLATE[:] = ["--templates", str(path)]


def tiny_args(checkpoint: Path, root: Path) -> list[str]:
    return ["eval", "--data-root", str(root), "--model", TINY, "--pretrained", str(checkpoint), "--device", "cpu"] + (
        ONE_TEMPLATE
    )


def run_eval(checkpoint, root, *extra) -> int:
    return main(tiny_args(checkpoint, root) + FAST + list(extra))


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    write_layout(root, "voc", n=5, size=(30, 40), seed=3)
    write_layout(root, "ade", n=3, size=(28, 36), seed=4)
    return root


def test_single_run_prints_table_and_writes_json(tiny_checkpoint, voc_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(tiny_args(tiny_checkpoint, voc_root) + FAST[:-1] + ["--dataset", "voc20", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "aeroplane" in printed and "tvmonitor" in printed  # per-class table
    assert "boat" in printed and "diningtable" in printed and "ship" not in printed  # VOC's names, not prompts
    assert "gclip on voc20: mIoU" in printed and "images 5" in printed and "images/s" in printed
    record = json.loads(out.read_text())
    assert set(record["versions"]) >= {"torch", "open_clip", "gclip", "python", "device"}
    run = record["runs"][0]
    assert run["settings"]["protocol"] == "clearclip" and run["settings"]["short_side"] == 32
    assert run["settings"]["overridden"] == ["crop", "short_side", "stride"]
    assert run["summary"]["images"] == 5 and len(run["per_class"]) == 20
    areas = np.array([[c[k] for c in run["per_class"]] for k in ("intersect", "union", "pred", "label")])
    assert (areas[1] == areas[2] + areas[3] - areas[0]).all()
    assert areas[3].sum() > 0 and areas[2].sum() == areas[3].sum()  # voc20: every scored pixel is predicted
    ious = [c["IoU"] for c in run["per_class"] if c["IoU"] is not None]
    assert run["summary"]["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=0.01)


def test_all_datasets_and_methods_give_the_markdown_table(tiny_checkpoint, voc_root, tmp_path, capsys):
    out = tmp_path / "all.json"
    code = run_eval(tiny_checkpoint, voc_root, "--dataset", "all", "--method", "clip,sclip", "--out", str(out))
    assert code == 0
    captured = capsys.readouterr()
    assert "cityscapes skipped" in captured.err and "context59 skipped" in captured.err
    record = json.loads(out.read_text())
    assert [(r["method"], r["dataset"]) for r in record["runs"]] == [
        (m, d) for m in ("clip", "sclip") for d in ("voc20", "ade20k", "voc21")
    ]
    table = record["table"].splitlines()
    assert table[0] == "| method | VOC20 | ADE20K | VOC21 | mean |"
    sclip_runs = [r for r in record["runs"] if r["method"] == "sclip"]
    values = [r["summary"]["mIoU"] for r in sclip_runs]
    assert table[3] == "| sclip | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / 3:.2f} |"
    assert sclip_runs[2]["settings"]["logit_scale"] == 65.0  # the SCLIP VOC21 preset
    assert record["table"] in captured.out


def test_save_predictions_in_label_values(tiny_checkpoint, voc_root, tmp_path):
    save = tmp_path / "pred"
    assert (
        run_eval(
            tiny_checkpoint,
            voc_root,
            "--dataset",
            "voc20,voc21",
            "--method",
            "maskclip",
            "--save-predictions",
            str(save),
            "--limit",
            "2",
        )
        == 0
    )
    for name in ("2007_000001", "2007_000002"):
        p20 = read_label_png(save / "maskclip" / "voc20" / f"{name}.png")
        p21 = read_label_png(save / "maskclip" / "voc21" / f"{name}.png")
        with Image.open(voc_root / f"VOCdevkit/VOC2012/JPEGImages/{name}.jpg") as img:
            assert p20.shape == p21.shape == img.size[::-1]
        assert p20.min() >= 1 and p20.max() <= 20  # voc20 predictions written as VOC label values 1..20
    assert not (save / "maskclip" / "voc20" / "2007_000003.png").exists()  # --limit 2


def test_bad_label_stops_or_is_skipped(tiny_checkpoint, tmp_path, capsys):
    write_layout(tmp_path, "ade", n=3)
    bad = tmp_path / "ade/ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    Image.new("L", (3, 3)).save(bad)
    assert run_eval(tiny_checkpoint, tmp_path, "--dataset", "ade20k") == 2
    err = capsys.readouterr().err
    assert err.startswith("gclip: error: ade20k: BROKEN") and "ADE_val_00000002: image 34x25, label 3x3" in err
    assert "--skip-bad" in err and "\n" not in err.strip()  # checked before the model loads: one line
    out = tmp_path / "r.json"
    assert run_eval(tiny_checkpoint, tmp_path, "--dataset", "ade20k", "--skip-bad", "--out", str(out)) == 1
    summary = json.loads(out.read_text())["runs"][0]
    assert summary["summary"]["images"] == 2 and summary["summary"]["skipped"] == 1
    assert summary["skipped"][0]["sample"] == "ADE_val_00000002"
    rows = (tmp_path / "r.csv").read_text(encoding="utf-8").splitlines()  # per-class IoU beside the JSON
    header = rows[0].split(",")
    assert header[:3] == ["method", "dataset", "class"] and "IoU" in header and len(rows) == 1 + 150
    first = json.loads(out.read_text())["runs"][0]["per_class"][0]
    cells = rows[1].split(",")
    assert cells[:3] == ["gclip", "ade20k", first["class"]] and cells[header.index("IoU")] == str(first["IoU"])
    assert "warning: skipped ADE_val_00000002" in capsys.readouterr().err


def test_own_class_files_and_per_set_option_paths(tiny_checkpoint, voc_root, tmp_path, capsys):
    """``--classes-dir`` (a method repository's cls_<set>.txt files) and ``{dataset}`` in a method option path
    (ITACLIP's per-set description files), for each set of the run."""
    from gclip.evaluation import get_dataset

    classes, defs = tmp_path / "configs", tmp_path / "texts"
    classes.mkdir(), defs.mkdir()
    for name in ("voc20", "voc21"):
        n = get_dataset(name).num_classes
        names = [f"thing{i} of {name}" for i in range(n)]
        (classes / f"cls_{name}.txt").write_text("\n".join(names) + "\n")
        (defs / f"{name}_definitions.txt").write_text("".join(f"{c} >=a {c} seen closely\n" for c in names))
    out = tmp_path / "r.json"
    options = json.dumps({"definitions": str(defs / "{dataset}_definitions.txt")})
    extra = ["--dataset", "voc20,voc21", "--method", "itaclip", "--method-options", options, "--limit", "1"]
    assert run_eval(tiny_checkpoint, voc_root, *extra, "--classes-dir", str(classes), "--out", str(out)) == 0
    runs = json.loads(out.read_text())["runs"]
    for run, name in zip(runs, ("voc20", "voc21")):
        assert run["per_class"][3]["prompt"] == f"thing3 of {name}"
        assert run["per_class"][3]["class"] == ("boat" if name == "voc20" else "bird")  # the dataset's name
        assert run["settings"]["classes_file"] == str(classes / f"cls_{name}.txt")
        assert run["settings"]["method_options"]["definitions"] == str(defs / f"{name}_definitions.txt")
    (defs / "voc21_definitions.txt").write_text("only >=one line\n")
    assert run_eval(tiny_checkpoint, voc_root, *extra, "--classes-dir", str(classes)) == 2
    err = capsys.readouterr().err
    assert "voc21_definitions.txt: 1 descriptions for 21 classes" in err and err.count("\n") == 1
    (classes / "cls_voc21.txt").unlink()
    assert run_eval(tiny_checkpoint, voc_root, "--dataset", "voc21", "--classes-dir", str(classes)) == 2
    assert capsys.readouterr().err == f"gclip: error: classes folder {classes}: no cls_voc21.txt for voc21\n"


def test_missing_dataset_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    assert run_eval(tiny_checkpoint, tmp_path, "--dataset", "cityscapes") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cityscapes/leftImg8bit/val" in err


def test_workers_give_the_same_areas(tiny_checkpoint, voc_root, tmp_path):
    outs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        main(
            tiny_args(tiny_checkpoint, voc_root)
            + FAST
            + ["--dataset", "ade20k", "--workers", workers, "--images-per-step", "2", "--out", str(out)]
        )
        outs.append(json.loads(out.read_text())["runs"][0]["per_class"])
    assert outs[0] == outs[1]


LAUNCHER = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from gclip.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.heavy
def test_two_processes_gloo_equal_one_process(tiny_checkpoint, voc_root, tmp_path):
    args = tiny_args(tiny_checkpoint, voc_root) + FAST + ["--dataset", "voc21,ade20k", "--images-per-step", "2"]
    single = tmp_path / "single.json"
    assert main(args + ["--out", str(single)]) == 0
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    double = tmp_path / "double.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher)]
    proc = subprocess.run(
        cmd + [str(HERE / "configs")] + args + ["--out", str(double)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(single.read_text())["runs"], json.loads(double.read_text())["runs"]
    assert [r["settings"]["world_size"] for r in b] == [2, 2]
    for ra, rb in zip(a, b):
        assert ra["per_class"] == rb["per_class"]
        assert ra["summary"]["images"] == rb["summary"]["images"] and ra["summary"]["mIoU"] == rb["summary"]["mIoU"]
    assert proc.stdout.count("gclip on voc21: mIoU") == 1  # only rank 0 prints


@pytest.mark.heavy
def test_vitb16_on_real_voc(sample_data, vitb16_checkpoint, tmp_path):
    """The real-model path once (small windows to keep CI fast; the full protocol run is in the README)."""
    out = tmp_path / "b16.json"
    code = main(
        [
            "eval",
            "--dataset",
            "voc20",
            "--data-root",
            str(sample_data),
            "--method",
            "gclip",
            "--limit",
            "2",
            "--pretrained",
            str(vitb16_checkpoint),
            "--device",
            "cpu",
            *ONE_TEMPLATE,
            "--short-side",
            "224",
            "--crop",
            "224",
            "--stride",
            "224",
            "--workers",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["images"] == 2 and run["summary"]["mIoU"] is not None
    assert run["settings"]["model"] == "ViT-B-16" and run["settings"]["crop"] == 224


def test_an_image_the_model_fails_on_stops_or_is_skipped(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Evaluation goes through the shared batch loop: the batch is retried image by image, and the image the
    model fails on is a one-line error (or skipped with --skip-bad) like a bad sample."""
    from gclip.inference.segmenter import Segmenter

    write_layout(tmp_path, "ade", n=3)
    real = Segmenter.infer

    def infer(self, prepared, return_probs=False):
        if any(p.key == "ADE_val_00000002" for p in prepared):
            raise RuntimeError("out of memory\nsecond line")
        return real(self, prepared, return_probs)

    monkeypatch.setattr(Segmenter, "infer", infer)
    assert run_eval(tiny_checkpoint, tmp_path, "--dataset", "ade20k", "--images-per-step", "3") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gclip: error: ")
    assert "ADE_val_00000002.jpg: RuntimeError: out of memory (pass --skip-bad" in lines[0]
    out = tmp_path / "r.json"
    args = ["--dataset", "ade20k", "--images-per-step", "3", "--skip-bad", "--out", str(out)]
    assert run_eval(tiny_checkpoint, tmp_path, *args) == 1
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["images"] == 2 and run["summary"]["skipped"] == 1
    assert run["skipped"][0]["sample"] == "ADE_val_00000002" and "RuntimeError" in run["skipped"][0]["reason"]
