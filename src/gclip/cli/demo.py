"""``gclip demo``: start the web demo (Gradio) on this machine, with the model loaded once."""

from __future__ import annotations

import argparse

from .common import add_model_args, load_model_from, proxy_options_from, second_model_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the web demo (needs gclip[demo])", description=__doc__)
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this machine)")
    g.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")
    g.add_argument("--concurrency", type=int, default=1, help="requests segmented at once (default: 1)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-upload-mb", type=float, default=10, help="largest upload in MB (default: 10)")
    g.add_argument("--max-megapixels", type=float, default=25, help="largest image in megapixels (default: 25)")
    g.add_argument("--work-side", type=int, default=1024, help="scale larger images to this long side (default 1024)")
    g.add_argument("--max-classes", type=int, default=30, help="most classes per request (default: 30)")
    g = p.add_argument_group("second models")
    g.add_argument(
        "--proxy", default=None, metavar="NAME", help="DINO model of proxyclip, cass and trident (their defaults)"
    )
    g.add_argument("--proxy-checkpoint", default=None, metavar="PATH", help="local weights file of that model")
    g.add_argument("--sam-checkpoint", default=None, metavar="PATH", help="SAM's weights file (trident, corrclip)")
    g.add_argument(
        "--mask-generator", default=None, metavar="NAME", help="SAM model making corrclip's instance masks: sam_vitb"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoService, Limits, launch
    from ..errors import ConfigError

    if args.max_upload_mb <= 0 or args.max_megapixels <= 0 or args.work_side < 32 or args.max_classes < 1:
        raise ConfigError("--max-upload-mb and --max-megapixels must be > 0, --work-side >= 32, --max-classes >= 1")
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be >= 1")
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000),
        work_side=args.work_side,
        max_classes=args.max_classes,
    )
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise ConfigError("the demo needs Gradio: pip install 'gclip[demo]'") from e
    proxy = proxy_options_from(args)
    from ..methods import methods_with_second_models

    options = {name: second_model_options(name, proxy) for name in methods_with_second_models()} if proxy else None
    service = DemoService(load_model_from(args), limits, method_options=options)
    try:
        launch(service, host=args.host, port=args.port, concurrency=args.concurrency)  # until Ctrl+C or SIGTERM
    finally:
        service.close()  # its temporary folder (uploads, downloads, Gradio's cache)
    return 0
