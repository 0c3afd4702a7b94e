"""``gclip bench``: speed and memory of the engine against the reference-style loop, recorded as JSON and Markdown."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
from pathlib import Path
from typing import Any

from .common import add_method_args, add_settings_args, method_options_from, settings_from


def _size(text: str) -> tuple[int, int]:
    """``WxH`` (e.g. ``500x375``) -> ``(H, W)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 500x375, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark speed and memory against the reference-style loop", description=__doc__)
    src = p.add_argument_group("images")
    src.add_argument(
        "--images",
        default="sample",
        help="a folder of images, 'examples' (the demo's 4 bundled photos), or 'sample' (the developers' VOC "
        "sample: ../shared/data or $GCLIP_SAMPLE_DATA; the default)",
    )
    src.add_argument("--synthetic", type=_size, metavar="WxH", help="synthetic JPEGs of this size instead")
    src.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    src.add_argument(
        "--vocabulary", help="bundled class list: voc21, ade20k, ... (default voc21; ade20k for --memory-check)"
    )
    src.add_argument("--classes", help="comma-separated class names instead of --vocabulary")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: ViT-B-16)")
    g.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint (default: random weights)")
    g.add_argument("--random-weights", action="store_true", help="deterministic random weights (no checkpoint)")
    g.add_argument("--model-config", action="append", default=[], metavar="DIR", help="extra open_clip configs")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--tokenizer", metavar="DIR", help="a local folder with a hub tokenizer's files (SigLIP, SigLIP 2)")
    add_method_args(p)
    add_settings_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--batch-images", type=int, default=8, help="images per call, decode to labels (default 8)")
    r.add_argument(
        "--workers",
        type=int,
        help="decoding processes of the pipelined pass, as `gclip segment` runs (default: up to 8 on a GPU, "
        "0 on a CPU: the staged pass alone)",
    )
    r.add_argument("--warmup", type=int, default=1, help="images run once before timing (default 1)")
    r.add_argument("--compile", action="store_true", help="torch.compile the per-window forward")
    r.add_argument("--no-reference", action="store_true", help="skip the reference-style loop")
    r.add_argument("--reference-count", type=int, help="images for the reference loop (default: all)")
    r.add_argument("--memory-check", action="store_true", help="peak RSS of one full-resolution photo instead")
    r.add_argument("--memory-size", type=_size, default=(3000, 4000), metavar="WxH", help="(default 4000x3000)")
    r.add_argument("--json", default="bench.json", help="where to write the JSON record (default bench.json)")
    r.add_argument(
        "--results", default=None, metavar="PATH", help="append to this Markdown log (benchmarks/RESULTS.md)"
    )
    r.add_argument("--no-record", action="store_true", help="(the default now) append to no Markdown log")
    p.set_defaults(func=run, _parser=p)


def command_line(args: argparse.Namespace) -> str:
    """The ``gclip bench`` command that reproduces ``args`` (options that differ from their defaults)."""
    parser: argparse.ArgumentParser = args._parser
    words = ["gclip", "bench"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "_parser"):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                words += [flag, str(v)]
        elif isinstance(value, tuple) and len(value) == 2:
            words += [flag, f"{value[1]}x{value[0]}"]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _config(args: argparse.Namespace):
    from ..demo.service import EXAMPLES_DIR
    from ..diagnostics.bench import BenchConfig

    random_weights = args.random_weights or args.pretrained is None
    return BenchConfig(
        model=args.model,
        pretrained=None if random_weights else args.pretrained,
        random_weights=random_weights,
        quick_gelu=args.quick_gelu if hasattr(args, "quick_gelu") else None,
        tokenizer=args.tokenizer,
        method=args.method,
        method_options=method_options_from(args),
        precision=args.precision,
        device=args.device,
        settings=settings_from(args),
        classes=args.classes or args.vocabulary or ("ade20k" if args.memory_check else "voc21"),
        templates=args.templates,
        images=str(EXAMPLES_DIR) if args.images == "examples" else args.images,
        synthetic=args.synthetic,
        count=args.count,
        batch_images=args.batch_images,
        workers=args.workers,
        warmup=args.warmup,
        reference=not args.no_reference,
        reference_count=args.reference_count,
        compile=args.compile,
        model_configs=list(args.model_config),
    )


def run(args: argparse.Namespace) -> int:
    from ..diagnostics.bench import machine_info, memory_check_subprocess, run_bench
    from ..errors import ConfigError
    from ..io.outputs import write_json

    if args.count < 1 or args.batch_images < 1 or (args.workers is not None and args.workers < 0):
        raise ConfigError("--count and --batch-images must be >= 1 and --workers >= 0")
    config = _config(args)
    command = command_line(args)
    if args.memory_check:
        record: dict[str, Any] = {"memory_check": memory_check_subprocess(config, args.memory_size, config.classes)}
        record["machine"] = machine_info()
    else:
        record = run_bench(config)
    record["command"] = command
    record["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(summary(record))
    write_json(record, args.json)
    print(f"JSON -> {args.json}")
    if args.results and not args.no_record:
        append_results(record, Path(args.results))
        print(f"appended to {args.results}")
    return 0


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} MB"


def _passes(record: dict[str, Any]) -> str:
    staged = record["staged"]
    if record.get("pipelined") is None:
        return f"one staged pass, decoding in-process ({staged['count']} images)"
    same = "identical" if record["pipelined_labels_identical"] else "DIFFERENT"
    return (
        f"pipelined with {record['workers']} decoding worker(s); the staged pass (stage split, latency) ran "
        f"{staged['images_per_s']:.2f} images/s, labels {same}"
    )


def _text_line(text: dict[str, Any]) -> str:
    rate = "-" if text["classes_per_s"] is None else f"{text['classes_per_s']:,.1f}"
    cached = text["cache_hits"]
    note = f", {cached} from the disk cache (GCLIP_NO_CACHE=1 encodes every one)" if cached else ""
    return (
        f"text: {text['classes']} classes ({text['queries']} prompts x {text['templates']} templates) in "
        f"{text['seconds']:.3f} s, {rate} classes/s{note}"
    )


def summary(record: dict[str, Any]) -> str:
    """A few human-readable lines."""
    if "memory_check" in record:
        m = record["memory_check"]
        return (
            f"memory check: {m['size'][1]}x{m['size'][0]} photo, {m['classes']} classes, {m['model']} {m['method']} "
            f"on {m['device']}: peak RSS {_mb(m['peak_rss_mb'])} (CUDA {_mb(m['cuda_peak_mb'])}), "
            f"{m['seconds']:.1f} s; naive canvas alone {_mb(m['naive_canvas_mb'])}"
        )
    st = record["stage_seconds"]
    lines = [
        f"{record['model']} ({record['pretrained']}) {record['method']} {record['precision']} on {record['device']}, "
        f"{record['images']}, {record['classes']} classes, {record['windows']} windows",
        f"engine: {record['images_per_s']:.2f} images/s, latency p50 {record['latency_ms']['p50']:.1f} ms "
        f"p95 {record['latency_ms']['p95']:.1f} ms, peak RSS {_mb(record['peak_rss_mb'])}, "
        f"CUDA peak {_mb(record['cuda_peak_mb'])}; {_passes(record)}",
        "stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in st.items()),
    ]
    if record.get("text"):
        lines.append(_text_line(record["text"]))
    if record["encoder_tflops_per_s"] is not None:
        tflops = record["encoder_tflops_per_s"]
        lines.append(f"image encoder: {record['encoder_gflop']:.1f} GFLOP, {tflops:.3f} TFLOP/s")
    ref = record.get("reference")
    if ref:
        ratio = record["images_per_s"] / ref["images_per_s"]
        lines.append(
            f"reference loop: {ref['images_per_s']:.2f} images/s (p50 {ref['latency_ms']['p50']:.1f} ms), "
            f"peak RSS {_mb(ref['peak_rss_mb'])}; engine is {ratio:.2f}x faster; labels identical: "
            f"{'yes' if ref['labels_identical'] else 'NO'} ({ref['mismatched_pixels']} pixels differ)"
        )
    return "\n".join(lines)


def markdown(record: dict[str, Any]) -> str:
    """The record as a Markdown section for ``benchmarks/RESULTS.md``."""
    m = record["machine"]
    machine = (
        f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads), GPU: {m['gpu'] or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}, open_clip {m['open_clip']}, gclip {m['gclip']}"
    )
    head = [f"### {record['date']}", "", f"- command: `{record['command']}`", f"- machine: {machine}"]
    if "memory_check" in record:
        c = record["memory_check"]
        head += [
            f"- memory check: one {c['size'][1]}x{c['size'][0]} photo at full resolution (`short_side=0`), "
            f"{c['classes']} classes, {c['model']} {c['method']} on {c['device']}: **peak RSS {_mb(c['peak_rss_mb'])}**"
            f" (CUDA {_mb(c['cuda_peak_mb'])}), {c['seconds']:.1f} s; the naive full-resolution canvas alone "
            f"would take {_mb(c['naive_canvas_mb'])}",
        ]
        return "\n".join(head) + "\n"
    ref = record.get("reference") or {}
    st = record["stage_seconds"]
    tflops = record["encoder_tflops_per_s"]
    head += [
        f"- setup: {record['model']} ({record['pretrained']}), {record['method']}, {record['precision']}, "
        f"{record['device']}, batch {record['batch_size']} windows / {record['batch_images']} images, "
        f"{record['images']} ({record['windows']} windows), {record['classes']} classes"
        + (", torch.compile" if record["compile"] else ""),
        f"- passes: {_passes(record)}",
        "",
        "| | engine | reference loop |",
        "|---|---|---|",
        f"| images/s | {record['images_per_s']:.2f} | {ref.get('images_per_s', float('nan')):.2f} |",
        f"| latency p50 / p95 (ms) | {record['latency_ms']['p50']:.1f} / {record['latency_ms']['p95']:.1f} | "
        + (f"{ref['latency_ms']['p50']:.1f} / {ref['latency_ms']['p95']:.1f} |" if ref else "- |"),
        f"| peak RSS | {_mb(record['peak_rss_mb'])} | {_mb(ref.get('peak_rss_mb'))} |",
        f"| CUDA peak | {_mb(record['cuda_peak_mb'])} | {_mb(ref.get('cuda_peak_mb'))} |",
        "",
        "- stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in st.items()),
        *([f"- {_text_line(record['text'])}"] if record.get("text") else []),
        f"- image encoder: {record['encoder_gflop']:.1f} GFLOP"
        + (f", {tflops:.3f} TFLOP/s achieved" if tflops is not None else ""),
    ]
    if ref:
        head.append(
            f"- speed-up over the reference loop: **{record['images_per_s'] / ref['images_per_s']:.2f}x**; "
            f"labels identical: {'yes' if ref['labels_identical'] else 'no'} "
            f"({ref['mismatched_pixels']} pixels differ on {ref['count']} images)"
        )
    return "\n".join(head) + "\n"


def append_results(record: dict[str, Any], path: Path) -> None:
    """Append the record's Markdown to ``path`` (created with a title if missing), atomically."""
    from ..io.outputs import atomic_path

    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results (`gclip bench`)\n"
    with atomic_path(path) as tmp:
        tmp.write_text(old.rstrip("\n") + "\n\n" + markdown(record), encoding="utf-8")
