"""``neuronatlas profile``: profile every FFN neuron of a model over a corpus into an atlas."""

from __future__ import annotations

import argparse

from .args import (corpus_args, debug_arg, doc_pools, finite_float, int_at_least, model_args, nonnegative_float, nonnegative_int,
                   out_arg, overwrite_arg, positive_float, quiet_arg, window_args)
from .common import preflight_output, read_corpus_from


def register(commands) -> None:
    parser = commands.add_parser("profile", help="profile every FFN neuron over a corpus into an atlas")
    model_args(parser)
    parser.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                        help="spread a model larger than one device over the GPUs and the CPU (accelerate); "
                             "replaces --device")
    parser.add_argument("--load-in", default=None, choices=["8bit", "4bit"],
                        help="quantise the linear layers while loading (needs bitsandbytes and a CUDA GPU)")
    corpus_args(parser, formats=True, folder=True)
    _profile_options(parser)
    out_arg(parser, "the atlas folder to write")
    overwrite_arg(parser, "replace an atlas already in --out")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted profile in --out")
    debug_arg(parser)
    parser.set_defaults(handler=run)


def _profile_options(parser: argparse.ArgumentParser) -> None:
    window_args(parser, max_length=None, default_text="min(model positions, 512)")
    parser.add_argument("--threshold", type=finite_float, default=0.0, help="active means activation > threshold (default: 0)")
    parser.add_argument("--top-k", type=nonnegative_int, default=20, help="exemplars kept per neuron (default: 20)")
    parser.add_argument("--bottom-k", type=nonnegative_int, default=10,
                        help="most negative exemplars of z kept per neuron, for signals that go below zero "
                             "(SiLU, GELU); only those below zero are saved (default: 10; 0 = none)")
    parser.add_argument("--no-gate", action="store_true", help="skip the gate signal of gated families")
    parser.add_argument("--padding-side", default="right", choices=["left", "right"])
    parser.add_argument("--doc-sample", type=nonnegative_int, default=None, metavar="N",
                        help="keep the pooled z of the first N documents of each label, for `find selectivity` "
                             "and the nulls of find (default: 512 documents shared by the labels, 32 to 256 a "
                             "label; 0 = none)")
    parser.add_argument("--doc-pools", type=doc_pools, default=["mean"], metavar="POOLS",
                        help="pools of z over a document to keep: mean, max or mean,max (default: mean; each "
                             "costs a byte a document and neuron)")
    parser.add_argument("--doc-format", default="ranks", choices=["ranks", "float16"],
                        help="the document sample on disk: ranks (a byte: each document's rank among the "
                             "sample, all find needs) or float16 values (two bytes; `merge` joins only these) "
                             "(default: ranks)")
    parser.add_argument("--no-positions", action="store_true",
                        help="skip the statistics per position bucket that `find positional` reads")
    parser.add_argument("--exemplar-radius", type=nonnegative_int, default=16, metavar="R",
                        help="keep each exemplar's z at R tokens either side, for the viewer and "
                             "explanations (cut from the batch in the same pass; default: 16; 0 = none)")
    parser.add_argument("--window-bits", type=int_at_least(2, 8), default=6, metavar="B",
                        help="bits a value of those windows, 2-8: 6 (default) keeps each within 9.4%% of itself, "
                             "8 within 2.2%% (0.3 KB a neuron more)")
    parser.add_argument("--threads", type=nonnegative_int, default=0, metavar="N",
                        help="threads for the statistics; 0 = auto: the forward's threads, between its layers, "
                             "or with cores to spare beyond them, those the machine's load leaves free, on a "
                             "thread beside the forward (default: 0)")
    parser.add_argument("--bucket-batches", type=int, default=8, metavar="N",
                        help="batch the windows of every N batches by length, so that padding is barely computed "
                             "(documents stay whole; the atlas is the same up to float rounding; checkpoints and "
                             "Ctrl-C take effect between such groups); 1 = corpus order (default: 8)")
    parser.add_argument("--batch-tokens", type=int_at_least(0), default=None, metavar="N",
                        help="more than --batch-size windows join a forward pass while it holds at most N padded "
                             "tokens, so short windows share one (default: as many as keep a layer's activations "
                             "within 4 MiB; 0 = --batch-size windows a batch)")
    parser.add_argument("--checkpoint-every", type=nonnegative_float, default=300.0, help="seconds between checkpoints (default: 300)")
    parser.add_argument("--dist-timeout", type=positive_float, default=1800.0, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others at the rendezvous and at the "
                             "merge (default: 1800)")
    quiet_arg(parser, "no progress bar (the summary is still printed)")


def _options(args):
    from ..profile import ProfileOptions

    return ProfileOptions(
        batch_size=args.batch_size, max_length=args.max_length, threshold=args.threshold, top_k=args.top_k,
        bottom_k=args.bottom_k, gate=not args.no_gate, padding_side=args.padding_side, dtype=args.dtype,
        doc_sample=args.doc_sample, doc_pools=args.doc_pools, doc_format=args.doc_format,
        positions=not args.no_positions, exemplar_radius=args.exemplar_radius,
        window_bits=args.window_bits,
        stat_threads=args.threads, bucket_batches=args.bucket_batches, batch_tokens=args.batch_tokens,
    )


def run(args) -> int:
    from ..distributed import launch_from_env
    from ..summary import print_summary

    # Existing output is profile()'s to judge (--resume, --overwrite, an interrupted run).
    preflight_output(args.out, "folder", overwrite=None, what="atlas")
    corpus = read_corpus_from(args)
    from ..profile import profile  # its import starts loading the kernels (profile/warm.py): inputs checked first

    atlas = profile(
        args.model, corpus, args.out, options=_options(args), device=args.device,
        device_map=args.device_map, load_in=args.load_in, overwrite=args.overwrite, resume=args.resume,
        quiet=args.quiet, checkpoint_every=args.checkpoint_every, trust_remote_code=args.trust_remote_code,
        dist_timeout=args.dist_timeout,
    )
    launch = launch_from_env()
    if launch is None or launch.rank == 0:  # one summary per job; --quiet hides progress only
        print_summary(atlas.summary())
        print(f"atlas written to {args.out}")
    return 0
