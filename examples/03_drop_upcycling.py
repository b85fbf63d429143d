"""Drop-Upcycling (Nakamura et al., ICLR 2025): re-initialise half of each expert's neurons at random.

Copies that start identical also receive near-identical gradients and are slow to specialise; re-drawing a
share R of each expert's intermediate neurons (a different share per expert, with the parent's weight
statistics) breaks the symmetry at the price of a worse start. Not function-preserving: convert says so and
reports the measured difference from the parent.

  upcycle convert PARENT moe --experts 8 --top-k 2 --expert-init drop:0.5 --no-verify
  upcycle train moe -d DATA -o run --steps 20
"""

import sys

import _common as c
from upcycle.convert import convert


def main(argv=None):
    args = c.options(__doc__, "drop-upcycling", argv)
    parent = c.parent(args)
    c.print_conversion(convert(parent, args.work / "moe", experts=8, top_k=2, expert_init="drop:0.5"))
    c.train_and_evaluate(args, args.work / "moe", parent)


if __name__ == "__main__":
    sys.exit(main())
