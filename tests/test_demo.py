"""The demo's engine and its Gradio callbacks, called directly with the tiny model (no server, no browser)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_second_models
from gclip.demo import DemoService, DemoSettings, Limits, parse_vocabulary
from gclip.demo.service import EXAMPLES_DIR, overlay
from gclip.errors import ClassesError
from gclip.io.outputs import class_colours, read_label_png

gr = pytest.importorskip("gradio")
ui = pytest.importorskip("gclip.demo.ui")

FAST = DemoSettings(short_side=64, crop=64)
HORSE = str(EXAMPLES_DIR / "horse.jpg")


@pytest.fixture
def service(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # restored after the test
    return DemoService(tiny_model, Limits(work_side=512), workdir=tmp_path / "work", defaults=FAST)


def call(service, image=HORSE, vocabulary="horse, person, wall", method="gclip", compare="none", **settings):
    s = {"short_side": 64, "crop": 64, "prob_thd": 0.0, "pamr_steps": 0, **settings}
    return ui.segment_callback(
        service, image, vocabulary, method, compare, s["short_side"], s["crop"], s["prob_thd"], s["pamr_steps"]
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cat, dog ,sky", [("cat",), ("dog",), ("sky",)]),
        ("cat,,dog,", [("cat",), ("dog",)]),
        ("person, people; car", [("person", "people"), ("car",)]),
        ("/etc/hostname.txt", [("/etc/hostname.txt",)]),
        ("", ClassesError),
        (" , ;", ClassesError),
        ("cat, Cat", ClassesError),
        (", ".join(f"c{i}" for i in range(31)), ClassesError),
        ("x" * 61, ClassesError),
    ],
)
def test_parse_vocabulary(text, expected):
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse_vocabulary(text)
    else:
        assert parse_vocabulary(text) == expected


def test_vocabulary_is_never_read_as_a_file(tmp_path):
    secret = tmp_path / "classes.txt"
    secret.write_text("secret\n")
    assert parse_vocabulary(str(secret), Limits(max_name_length=1000)) == [(str(secret),)]


def test_callback_result_download_and_legend(service):
    shown, compared, label_path, overlay_path, status = call(service)
    image, annotations = shown["value"]
    h, w = np.asarray(Image.open(HORSE)).shape[:2]
    assert image.shape == (h, w, 3)
    labels = read_label_png(label_path)
    assert labels.shape == (h, w)
    # Masks partition the image and match the downloadable label map, colours come from the palette.
    coverage = sum(mask for mask, _ in annotations)
    np.testing.assert_array_equal(coverage, np.ones((h, w)))
    names = ["horse", "person", "wall"]
    for mask, legend in annotations:
        index = names.index(legend.split(" (")[0])
        np.testing.assert_array_equal(mask.astype(bool), labels == index)
        assert shown["color_map"][legend] == "#{:02x}{:02x}{:02x}".format(*class_colours(256)[index])
    with Image.open(overlay_path) as ov:
        assert ov.size == (w, h)
        np.testing.assert_array_equal(np.asarray(ov), overlay(image, labels))
    assert shown["label"] == "gclip" and compared["visible"] is False
    assert status.startswith("**gclip**") and f"{w}x{h}" in status


def test_comparison_runs_the_second_method_on_the_same_model(service):
    shown, compared, _, _, status = call(service, method="gclip", compare="maskclip")
    assert compared["visible"] is True and compared["label"] == "maskclip"
    assert compared["value"][0].shape == shown["value"][0].shape
    assert "**maskclip**" in status
    direct = service.segment(HORSE, "horse, person, wall", "maskclip", FAST)
    masks = {legend.split(" (")[0]: mask for mask, legend in compared["value"][1]}
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask.astype(bool), direct.result.mask(name))
    assert service._segmenters["gclip"].model is service._segmenters["maskclip"].model


def test_threshold_and_settings_reach_the_segmenter(service):
    shown, _, label_path, _, status = call(service, vocabulary="horse, person, wall", prob_thd=1.0)
    assert [legend for _, legend in shown["value"][1]] == [] and "100% unlabeled" in status  # not "horse"
    assert (read_label_png(label_path) == -1).all()
    shown, *_ = call(service, vocabulary="background, horse, person", prob_thd=1.0)
    assert [legend for _, legend in shown["value"][1]] == ["background (100%)"]
    assert service._segmenters["gclip"].settings.prob_thd == 1.0
    call(service, short_side=96, crop=0, pamr_steps=2)
    s = service._segmenters["gclip"].settings
    assert (s.short_side, s.crop, s.pamr_steps) == (96, 0, 2)


def test_large_images_are_scaled_down_and_huge_ones_refused(service, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.full((300, 600, 3), 90, np.uint8)).save(big)
    shown, *_, status = call(service, image=str(big))
    assert shown["value"][0].shape == (256, 512, 3)
    assert "scaled down from 600x300 to 512x256" in status
    small = DemoService(service.model, Limits(max_pixels=10_000), workdir=tmp_path / "w2")
    with pytest.raises(gr.Error, match="pixels") as err:
        call(small, image=str(big))
    assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": None}, "upload an image"),
        ({"vocabulary": " "}, "at least one class"),
        ({"vocabulary": ", ".join(f"c{i}" for i in range(31))}, "at most 30"),
        ({"method": "nope"}, "unknown method"),
        ({"crop": 64, "short_side": -16}, "short_side"),
    ],
)
def test_bad_requests_give_one_line_errors(service, kwargs, message):
    with pytest.raises(gr.Error, match=message) as err:
        call(service, **kwargs)
    assert "\n" not in str(err.value)


def test_broken_upload_is_reported_without_server_paths(service, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(gr.Error, match="cannot decode") as err:
        call(service, image=str(broken))
    assert str(tmp_path) not in str(err.value)


def test_concurrent_requests_do_not_mix_vocabularies(service):
    vocabularies = ["horse, person, wall", "sky, grass", "door, hay, tree, dog"]
    expected = {v: service.segment(HORSE, v, "gclip", FAST).result.labels for v in vocabularies}
    got, errors = {}, []

    def worker(v: str) -> None:
        try:
            for _ in range(2):
                out = service.segment(HORSE, v, "gclip", FAST)
                assert out.result.class_names == [c[0] for c in parse_vocabulary(v)]
                got[v] = out.result.labels
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(v,)) for v in vocabularies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for v in vocabularies:
        np.testing.assert_array_equal(got[v], expected[v])


def test_old_downloads_are_pruned(service):
    first = service.segment(HORSE, "horse, wall", "gclip", FAST)
    service.limits = Limits(keep_seconds=-1)
    second = service.segment(HORSE, "horse, wall", "gclip", FAST)
    assert not first.label_png.exists() and second.label_png.exists()


def test_build_demo_keeps_gradio_files_in_the_app_folder(service):
    demo = ui.build_demo(service)
    options = ui.launch_options(service)
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["allowed_paths"] == [str(EXAMPLES_DIR), str(service.downloads)]
    assert demo.GRADIO_CACHE == str(service.workdir / "gradio")


def test_cli_demo_rejects_bad_limits(capsys):
    from gclip.cli import main

    assert main(["demo", "--max-classes", "0"]) == 2
    assert "--max-classes" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["cass", "trident"])
def test_the_demo_runs_the_methods_with_second_models(tiny_model, tmp_path, monkeypatch, method):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    options = {method: tiny_second_models(method)}
    service = DemoService(
        tiny_model, Limits(work_side=512), workdir=tmp_path / "work", defaults=FAST, method_options=options
    )
    outcome = service.segment(HORSE, "horse, person, wall", method, FAST)
    h, w = np.asarray(Image.open(HORSE)).shape[:2]
    assert outcome.result.labels.shape == (h, w)


def test_the_demo_runs_corrclip_with_sams_mask_generator(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    options = {"corrclip": {**tiny_second_models("corrclip"), "window_pad": 8}}
    service = DemoService(
        tiny_model, Limits(work_side=512), workdir=tmp_path / "work", defaults=FAST, method_options=options
    )
    outcome = service.segment(HORSE, "horse, person, wall", "corrclip", FAST)
    assert outcome.result.labels.shape == np.asarray(Image.open(HORSE)).shape[:2]


def test_an_upload_gradio_cannot_open_gets_a_one_line_error_naming_it(service, tmp_path):
    """Gradio opens the upload before the callback runs: its failure is reported with the file and the reason."""
    from gradio.data_classes import ImageData

    demo = ui.build_demo(service)
    photo = next(block for block in demo.blocks.values() if isinstance(block, gr.Image) and block.label == "Photo")
    broken = tmp_path / "upload" / "holiday.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(gr.Error, match="cannot decode holiday.jpg: not an image file") as err:
        photo.preprocess(ImageData(path=str(broken), orig_name="holiday.jpg"))
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert photo.preprocess(ImageData(path=HORSE, orig_name="horse.jpg")) == HORSE  # good uploads pass


def test_the_temporary_work_folder_goes_on_close_a_given_one_stays(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    own = DemoService(tiny_model)
    assert own.workdir.parent == tmp_path and own.downloads.is_dir()
    own.close()
    assert not own.workdir.exists()
    given = DemoService(tiny_model, workdir=tmp_path / "mine")
    given.close()
    assert given.downloads.is_dir()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_cli_demo_stops_on_a_signal_and_leaves_no_temporary_folder(tiny_checkpoint, tmp_path, stop):
    """`gclip demo` prints its own address (no `share=True` hint: the CLI has no such option), and Ctrl+C or
    SIGTERM stops it with its temporary folder (uploads, downloads, Gradio's cache) removed."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import gclip
    from conftest import HERE, TINY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from gclip.cli import main; "
    runner += "sys.exit(main(sys.argv[2:]))"
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(gclip.__file__).parents[1]), "TMPDIR": str(temp)}
    env.pop("GRADIO_TEMP_DIR", None)
    args = ["demo", "--model", TINY, "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-c", runner, str(HERE / "configs"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    try:
        while not any(ln.startswith("gclip demo: http") for ln in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        assert f"gclip demo: http://127.0.0.1:{port}" in "".join(lines), "".join(lines)
        assert list(temp.glob("gclip-demo-*")), "the demo made its temporary folder"
        proc.send_signal(getattr(signal, stop))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    printed = "".join(lines)
    assert proc.returncode == 0, printed
    assert "share=True" not in printed and "Traceback" not in printed
    assert not list(temp.glob("gclip-demo-*")), printed
