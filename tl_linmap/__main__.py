"""Command line: ``python -m tl_linmap demo "prompt"`` and ``python -m tl_linmap report "prompt" -o report.html``."""

from __future__ import annotations

import argparse
import warnings

from tl_linmap.loading import BUNDLED, DEFAULT_MODEL


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m tl_linmap`` and the ``tl-linmap`` script.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="tl-linmap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="exact linear map of a prompt's next-token prediction")
    report = commands.add_parser("report", help="write a self-contained HTML page about a prompt's linear system")
    for command in (demo, report):
        command.add_argument("prompt", nargs="?", default="The capital of France is")
        command.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"bundled name ({', '.join(BUNDLED)}), a .gguf file, a Hugging Face directory or hub name",
        )
    demo.add_argument("--top", type=int, default=5, help="tokens per list")
    report.add_argument("-o", "--output", default="report.html", help="where the page goes")
    report.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="comma-separated layers to map (default: six evenly spaced)")
    report.add_argument("--top", type=int, default=8, help="tokens per decoded vector")
    args = parser.parse_args(argv)

    from tl_linmap.loading import load_model

    warnings.filterwarnings("ignore", module="transformer_lens")
    model = load_model(args.model)
    if args.command == "demo":
        from tl_linmap.demo import demo_report

        print(demo_report(model, args.prompt, top=args.top))
    else:
        from tl_linmap.report import write_report

        print(f"wrote {write_report(model, args.prompt, args.output, layers=args.layers, top=args.top)}")


if __name__ == "__main__":
    main()
