"""Command line: ``python -m tl_linmap demo "prompt" [--model NAME]``."""

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
    demo.add_argument("prompt", nargs="?", default="The capital of France is")
    demo.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"bundled name ({', '.join(BUNDLED)}), a .gguf file, a Hugging Face directory or hub name",
    )
    demo.add_argument("--top", type=int, default=5, help="tokens per list")
    args = parser.parse_args(argv)

    from tl_linmap.demo import demo_report
    from tl_linmap.loading import load_model

    warnings.filterwarnings("ignore", module="transformer_lens")
    print(demo_report(load_model(args.model), args.prompt, top=args.top))


if __name__ == "__main__":
    main()
