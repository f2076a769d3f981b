"""The concept vector and the paper's steering operator side by side on a real model (README table).

For each concept, one source prompt's map at ``blocks.{layer}.hook_resid_post`` steers a fixed
neutral prompt; a FIXED continuation is scored teacher-forced (the same tokens for both methods
and every alpha), and the table gives the concept tokens' mean log-probability shift in nats.

Usage: python scripts/steering_compare.py [--model smollm2] [--layer 15] [--alphas 0 0.05 0.1 0.2 0.3]
"""

import argparse
import warnings

import tl_linmap
from tl_linmap.methods.steering import compare_methods, word_tokens

#: Concept label -> (source prompt, words whose single-token spellings are measured).
CONCEPTS = {
    "Paris": ("The Eiffel Tower in Paris, France", "Paris France French Eiffel"),
    "ocean": ("The waves of the ocean and the deep blue sea water", "ocean sea water waves beach"),
    "music": ("The music of a piano and a guitar playing a song", "music song piano guitar melody"),
}
PROMPT = "My favourite thing to do on the weekend is"
CONTINUATION = " to go for a long walk with my friends, and then we have lunch together in a small place near the station."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = tl_linmap.load_model(args.model)
    target = f"blocks.{args.layer}.hook_resid_post"
    sources = {label: tl_linmap.linear_map(model, text, target=target) for label, (text, _) in CONCEPTS.items()}
    concept_tokens = {label: word_tokens(model, words) for label, (_, words) in CONCEPTS.items()}
    table = compare_methods(model, sources, PROMPT, CONTINUATION, layer=args.layer, alphas=args.alphas,
                            concept_tokens=concept_tokens)
    print(f"{args.model}, layer {args.layer}; prompt {PROMPT!r}, fixed continuation {CONTINUATION!r}")
    for label, (text, _) in CONCEPTS.items():
        print(f"  {label}: source {text!r}, measured on {concept_tokens[label]}")
    print(f"\n{table.to_string(cell_width=None)}\n")
    print("| alpha | " + " | ".join(f"{label}: vector | {label}: operator" for label in CONCEPTS) + " |")
    print("|---|" + "---|---|" * len(CONCEPTS))
    for alpha in args.alphas:
        rows = {row.concept: row for row in table if row.alpha == alpha}
        print(f"| {alpha:g} | " + " | ".join(f"{rows[c].vector:+.2f} | {rows[c].operator:+.2f}" for c in CONCEPTS) + " |")


if __name__ == "__main__":
    main()
