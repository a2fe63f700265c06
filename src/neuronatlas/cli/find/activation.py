"""``find lape`` and ``find dead``: neurons chosen from an atlas's activation statistics."""

from __future__ import annotations

from ..args import out_arg
from .base import FindMethod, check_label_field, label_field_arg, null_options, save


def _lape_options(parser) -> None:
    parser.add_argument("--atlas", required=True, help="an atlas profiled with labels (--label-field)")
    out_arg(parser)
    parser.add_argument("--top-rate", type=float, default=0.01, help="share of all neurons kept (default: 0.01)")
    parser.add_argument("--percentile", type=float, default=0.95,
                        help="tau = this quantile of all activation probabilities (default: 0.95)")
    parser.add_argument("--assign-percentile", type=float, default=None,
                        help="a kept neuron belongs to every label whose probability is above this quantile of "
                             "all of them (default: --percentile, as in the paper)")
    parser.add_argument("--signal", default=None, help="gate or z (default: gate when the atlas has it, else z)")
    parser.add_argument("--no-filter", action="store_true",
                        help="keep neurons with no label above tau (they go to their argmax label)")
    label_field_arg(parser)


def _run_lape(args) -> int:
    from ...atlas import load_atlas
    from ...methods.lape import find_lape

    atlas = load_atlas(args.atlas)
    check_label_field(atlas, args.label_field)
    found = find_lape(atlas, top_rate=args.top_rate, percentile=args.percentile, signal=args.signal,
                      filter=not args.no_filter, null=null_options(args), assign_percentile=args.assign_percentile)
    save(found, args, f"signal {found.params['signal']}, tau {found.params['tau']:.4g}")
    return 0


def _dead_options(parser) -> None:
    parser.add_argument("--atlas", required=True, help="an atlas folder")
    out_arg(parser)
    parser.add_argument("--max-rate", type=float, default=0.0,
                        help="keep neurons active on at most this share of tokens (default: 0 = dead)")
    parser.add_argument("--signal", default="z", help="z or gate (default: z)")


def _run_dead(args) -> int:
    from ...atlas import load_atlas
    from ...methods.dead import find_dead

    found = find_dead(load_atlas(args.atlas), max_rate=args.max_rate, signal=args.signal)
    save(found, args, f"rate <= {args.max_rate:g} on signal {found.params['signal']}")
    return 0


METHODS = (
    FindMethod("lape", "label (language) specific neurons by activation probability entropy "
               "(--no-null: the paper's set, without the permutation null)", ("atlas",),
               _lape_options, _run_lape, permutations=20),
    FindMethod("dead", "neurons never (or rarely) active over the profiled corpus", ("atlas",),
               _dead_options, _run_dead),
)
