"""The Gradio app: upload or pick a photo, type classes, pick methods and settings, see and download results."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from ..errors import GclipError  # noqa: E402
from .service import EXAMPLES_DIR, DemoService, DemoSettings, Outcome, hex_colour  # noqa: E402

__all__ = ["EXAMPLES", "segment_callback", "build_demo", "launch_options", "launch", "report_undecodable"]

NO_COMPARISON = "none"
EXAMPLES = [
    ("street_bus.jpg", "bus, road, building, tree, sky, car, person"),
    ("living_room.jpg", "floor, wall, ceiling, sofa, chair, table, lamp, fireplace, window, rug"),
    ("horse.jpg", "horse, person, wall, door, hay"),
    ("harbour.jpg", "sailboat, water, sky, building, hill"),
]


def _stem(image: Any) -> str:
    name = Path(str(image)).stem if isinstance(image, (str, Path)) else "image"
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "image"


def _annotations(outcome: Outcome) -> tuple[tuple[Any, list[tuple[Any, str]]], dict[str, str]]:
    """``(image, [(mask, legend label), ...])`` and the legend's colours, largest class first."""
    result = outcome.result
    annotations, colours = [], {}
    for name, fraction in result.class_fractions().items():
        index = result.class_names.index(name)
        label = f"{name} ({fraction:.0%})" if fraction >= 0.005 else f"{name} (<1%)"
        annotations.append(((result.labels == index).astype("float32"), label))
        colours[label] = hex_colour(index, result.background)
    return (outcome.image, annotations), colours


def _status(outcome: Outcome, note: str) -> str:
    h, w = outcome.result.size
    present = len(outcome.result.class_fractions())
    text = f"**{outcome.method}**: {w}x{h} px, {present} of {len(outcome.result.class_names)} classes present"
    if outcome.result.unlabeled_fraction:  # under the probability threshold, no background class
        text += f", {outcome.result.unlabeled_fraction:.0%} unlabeled"
    return text + f", {outcome.seconds:.2f} s" + (f" ({note})" if note else "")


def segment_callback(
    service: DemoService,
    image: Any,
    vocabulary: str,
    method: str,
    compare: str,
    short_side: float,
    crop: float,
    prob_thd: float,
    pamr_steps: float,
) -> tuple[dict, dict, str, str, str]:
    """The "Segment" button: one or two methods on the uploaded image.

    Returns:
        Updates for the main and the comparison ``AnnotatedImage``, the label PNG and overlay PNG paths
        for the download buttons, and a Markdown status line.

    Raises:
        gr.Error: a one-line message shown to the user (bad image, vocabulary, method or setting).
    """
    try:
        array, note = service.load(image)
        settings = DemoSettings(int(short_side), int(crop), float(prob_thd), int(pamr_steps))
        main = service.segment(array, vocabulary, method, settings, stem=_stem(image))
        second = None
        if compare and compare != NO_COMPARISON and compare != method:
            second = service.segment(array, vocabulary, compare, settings, stem=_stem(image))
    except GclipError as e:
        raise gr.Error(str(e), print_exception=False) from None
    value, colours = _annotations(main)
    status = [_status(main, note)]
    if second is None:
        compared = gr.update(value=None, visible=False)
    else:
        second_value, second_colours = _annotations(second)
        compared = gr.update(value=second_value, color_map=second_colours, label=second.method, visible=True)
        status.append(_status(second, ""))
    shown = gr.update(value=value, color_map=colours, label=main.method)
    return shown, compared, str(main.label_png), str(main.overlay_png), "  \n".join(status)


def report_undecodable(component: gr.Image) -> gr.Image:
    """Make ``component`` answer an upload it cannot open with a one-line :class:`gr.Error` naming the file and
    the reason (Gradio opens the upload itself, before the app sees it, and reports a failure as a bare
    "Error")."""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - PIL and Gradio raise many types for a bad upload
            name = Path(str(getattr(payload, "orig_name", None) or "the upload")).name
            reason = "not an image file gclip can read (JPEG, PNG, WebP, BMP, TIFF ...)"
            if not isinstance(e, (OSError, ValueError, SyntaxError)):
                reason += f"; {type(e).__name__}"
            raise gr.Error(f"cannot decode {name}: {reason}", print_exception=False) from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _prepare_folders(service: DemoService) -> None:
    """Point Gradio's upload and cache folders into the app's own work folder (before any Blocks exist)."""
    os.environ["GRADIO_TEMP_DIR"] = str(service.workdir / "gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(service.workdir / "examples-cache")


def build_demo(service: DemoService) -> gr.Blocks:
    """The app's layout and events (not launched)."""
    _prepare_folders(service)
    limits, defaults = service.limits, service.defaults
    methods = service.methods
    with gr.Blocks(title="gclip demo", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# gclip: open-vocabulary segmentation with CLIP\n"
            "Upload a photo (or pick an example), type the classes to look for, and press **Segment**. "
            f"Model: `{service.describe_model()}`. Up to {limits.max_classes} classes; images up to "
            f"{limits.max_upload_bytes / 2**20:.3g} MB and {limits.max_pixels / 1e6:.0f} megapixels "
            f"(scaled down to {limits.work_side} px on the long side)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"], height=320)
                report_undecodable(image)
                vocabulary = gr.Textbox(
                    label="Classes",
                    placeholder="cat, dog, grass, sky",
                    info='Comma-separated. With ";" between classes, "," separates synonyms: "person, people; car".',
                    max_length=limits.max_classes * (limits.max_name_length + 2),
                    elem_id="vocabulary",
                )
                with gr.Row():
                    first = "gclip" if "gclip" in methods else methods[0]
                    method = gr.Dropdown(methods, value=first, label="Method", elem_id="method")
                    compare_choices = [NO_COMPARISON, *methods]
                    default_compare = "clearclip" if "clearclip" in methods and first != "clearclip" else NO_COMPARISON
                    compare = gr.Dropdown(compare_choices, value=default_compare, label="Compare with")
                with gr.Accordion("Settings", open=False):
                    short_side = gr.Slider(
                        0, 1024, value=defaults.short_side, step=16, label="Short side (0: keep the size)"
                    )
                    crop = gr.Slider(
                        0, 1024, value=defaults.crop, step=16, label="Window (0: whole image; stride = half)"
                    )
                    prob_thd = gr.Slider(
                        0,
                        1,
                        value=defaults.prob_thd,
                        step=0.05,
                        label="Probability threshold (pixels below: unlabeled, or a first class named background)",
                    )
                    pamr_steps = gr.Slider(
                        0, 20, value=defaults.pamr_steps, step=1, label="PAMR refinement steps (0: off)"
                    )
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples(
                    examples=[[str(EXAMPLES_DIR / name), classes] for name, classes in EXAMPLES],
                    inputs=[image, vocabulary],
                    label="Examples",
                )
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    shown = gr.AnnotatedImage(label="Result", elem_id="result", height=420)
                    compared = gr.AnnotatedImage(label="Comparison", elem_id="comparison", height=420)
                with gr.Row():
                    label_file = gr.DownloadButton("Label map (PNG)", elem_id="download-labels")
                    overlay_file = gr.DownloadButton("Overlay (PNG)", elem_id="download-overlay")

        def on_segment(*args: Any) -> tuple[dict, dict, str, str, str]:
            return segment_callback(service, *args)

        run.click(
            on_segment,
            inputs=[image, vocabulary, method, compare, short_side, crop, prob_thd, pamr_steps],
            outputs=[shown, compared, label_file, overlay_file, status],
            api_name="segment",
        )
    return demo


def launch_options(service: DemoService, host: str = "127.0.0.1", port: int | None = None) -> dict[str, Any]:
    """The arguments of ``Blocks.launch``: local only, no share link, uploads capped, only the app's folders."""
    return {
        "server_name": host,
        "server_port": port,
        "share": False,
        "max_file_size": service.limits.max_upload_bytes,
        "allowed_paths": [str(EXAMPLES_DIR), str(service.downloads)],
        "show_error": False,
        "ssr_mode": False,
        "mcp_server": False,
        "pwa": False,
        "enable_monitoring": False,
        "footer_links": [],
        "run_history": False,
    }


def launch(
    service: DemoService,
    host: str = "127.0.0.1",
    port: int | None = None,
    concurrency: int = 1,
    max_queue: int = 32,
    block: bool = True,
    quiet: bool = False,
) -> gr.Blocks:
    """Build and start the app; returns the running ``Blocks`` (call ``.close()`` to stop it).

    Args:
        service: the engine (model loaded once).
        host: interface to listen on (``127.0.0.1``: this machine only).
        port: TCP port (``None``: Gradio's default 7860, or the next free one).
        concurrency: requests segmented at the same time (they share one model and take turns on a lock).
        max_queue: requests waiting beyond that are refused.
        block: ``False`` returns at once with the server running in a thread; ``True`` serves until Ctrl+C or
            SIGTERM, then stops the server.
        quiet: do not print the URL (Gradio's own lines are never printed).
    """
    demo = build_demo(service)
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    # Gradio's own lines suggest share=True, which gclip does not offer: print the address here instead.
    demo.launch(**launch_options(service, host, port), prevent_thread_lock=True, quiet=True)
    if not quiet:
        stop = "Ctrl+C stops it" if block else "close() stops it"
        print(f"gclip demo: {demo.local_url} ({service.describe_model()}; {stop})", flush=True)
    if block:
        with _terminate_as_interrupt():
            try:
                while demo.is_running:
                    time.sleep(0.1)
            except KeyboardInterrupt:
                pass
            finally:
                demo.close()
    return demo


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops the server as Ctrl+C does (so the work folder is cleaned up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
