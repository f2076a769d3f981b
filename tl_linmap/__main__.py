"""Command line: ``tl-linmap demo`` and ``tl-linmap report`` (also ``python -m tl_linmap``)."""

from __future__ import annotations

import argparse
import warnings

from tl_linmap.load.models import BUNDLED, DEFAULT_MODEL, KINDS

DEFAULT_PROMPT = "The capital of France is"

# Help text is printed as written (RawDescriptionHelpFormatter), so it is plain text, not reST.
DESCRIPTION = """\
One inference of a TransformerLens model as an exactly equivalent linear system,
y = sum_i J_i x_i + b, with one d_model x d_model operator J_i per input token.

Run 'tl-linmap COMMAND --help' for the options of a command."""

EPILOG = f"""\
examples:
  tl-linmap demo
  tl-linmap demo "The Eiffel Tower is in" --model gemma3-270m --top 8
  tl-linmap report "The capital of France is" -o report.html --layers 0,10,20,29
  python -m tl_linmap demo          (the same, without the installed script)

models (--model): a bundled name ({", ".join(BUNDLED)}; default {DEFAULT_MODEL}),
a local .gguf file, a local Hugging Face directory, or a hub name (needs network)."""

DEMO = """\
Compute the exact linear map of the prompt's next-token output (the final norm's
output at the last token) and print: the relative reconstruction error in float64
and float32, the top next tokens of the model and of the reconstruction, the norm
of each input token's contribution J_i x_i, and the top singular pairs of the
largest operator read as tokens."""

REPORT = """\
Write one self-contained HTML page (figures inline, nothing fetched) about the
prompt's linear system: the reconstruction check, each token's contribution and
its part of the predicted token's logit, the spectra and dimensionality per layer,
and the singular vectors across layers read as tokens."""


def _layers(text: str) -> list[int]:
    # "0,10,29" -> [0, 10, 29], with an error message argparse prints as is.
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 0,10,29, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``tl-linmap``.

    Returns:
        A parser with the subcommands ``demo`` and ``report``.
    """
    formatter = argparse.RawDescriptionHelpFormatter
    main_parser = argparse.ArgumentParser(
        prog="tl-linmap", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter,
    )
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="print a prompt's exact linear map: error, top tokens, contributions", description=DEMO, epilog=EPILOG, formatter_class=formatter,
    )
    report = commands.add_parser(
        "report", help="write an HTML page about a prompt's linear system", description=REPORT, epilog=EPILOG,
        formatter_class=formatter,
    )
    for command in (demo, report):
        command.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"the input text (default: {DEFAULT_PROMPT!r})")
        command.add_argument(
            "--model", default=DEFAULT_MODEL,
            help=f"bundled name ({', '.join(BUNDLED)}), .gguf file, Hugging Face directory or hub name (default: {DEFAULT_MODEL})",
        )
        command.add_argument(
            "--kind", choices=KINDS, default=None,
            help="TransformerBridge or HookedTransformer (default: the bridge where TransformerLens has one, 3.x and 4.x)",
        )
    demo.add_argument("--top", type=int, default=5, help="tokens per list (default: 5)")
    report.add_argument("-o", "--output", default="report.html", help="where the page goes (default: report.html)")
    report.add_argument("--layers", type=_layers, default=None, metavar="L1,L2,...",
                        help="comma-separated layers to map (default: six evenly spaced)")
    report.add_argument("--top", type=int, default=8, help="tokens per decoded vector (default: 8)")
    return main_parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m tl_linmap`` and the ``tl-linmap`` script.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    args = parser().parse_args(argv)

    from tl_linmap.load.models import load_model

    warnings.filterwarnings("ignore", module="transformer_lens")
    model = load_model(args.model, kind=args.kind)
    if args.command == "demo":
        from tl_linmap.app.demo import demo_report

        print(demo_report(model, args.prompt, top=args.top))
    else:
        from tl_linmap.app.report import write_report

        print(f"wrote {write_report(model, args.prompt, args.output, layers=args.layers, top=args.top)}")


if __name__ == "__main__":
    main()
