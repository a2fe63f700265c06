"""``neuronatlas vocab``: the tokens one neuron's value vector promotes and suppresses."""

from __future__ import annotations

import json

from .args import debug_arg, model_args, nonnegative_int, positive_int
from .common import load_model_from


def register(commands) -> None:
    parser = commands.add_parser("vocab", help="the tokens one neuron's value vector promotes and suppresses")
    model_args(parser)
    parser.add_argument("--layer", type=nonnegative_int, required=True)
    parser.add_argument("--index", type=nonnegative_int, required=True, help="the neuron's index within its layer")
    parser.add_argument("--top", type=positive_int, default=30, help="tokens shown each way (default: 30)")
    parser.add_argument("--through-norm", action="store_true", help="scale by the final norm's weight first")
    parser.add_argument("--json", action="store_true", help="print JSON")
    debug_arg(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..methods.vocab import vocab_projection

    model, tokenizer = load_model_from(args)
    result = vocab_projection(model, args.layer, args.index, top=args.top, through_norm=args.through_norm,
                              tokenizer=tokenizer)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return 0
    print(f"neuron {args.layer}:{args.index} of {args.model}" + (" (through the final norm)" if args.through_norm else ""))
    print(f"{'promoted':>32} {'logit':>9}   {'suppressed':>32} {'logit':>9}")
    for up, down in zip(result["promoted"], result["suppressed"]):
        print(f"{_shown(up):>32} {up['logit']:>9.3f}   {_shown(down):>32} {down['logit']:>9.3f}")
    return 0


def _shown(row: dict) -> str:
    """A token as printed in the table: its repr, or its id when it is empty or blank."""
    if not row["token"] or not row["token"].strip():
        return f"<{row['id']}>" if not row["token"] else f"{row['token']!r} <{row['id']}>"[:32]
    return repr(row["token"])[1:-1][:32]
