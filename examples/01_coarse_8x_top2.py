"""Plain sparse upcycling (Komatsuzaki et al., 2022): each MLP copied into 8 experts, 2 chosen per token.

The converted model computes exactly what the parent computes (identical experts: any routing gives the MLP);
training then lets the experts drift apart. Same thing on the command line:

  upcycle convert PARENT moe --experts 8 --top-k 2
  upcycle train moe -d DATA -o run --steps 20
  upcycle eval run/final --parent PARENT -d HELDOUT --split all
"""

import sys

import _common as c
from upcycle.convert import convert


def main(argv=None):
    args = c.options(__doc__, "coarse", argv)
    parent = c.parent(args)
    c.print_conversion(convert(parent, args.work / "moe", experts=8, top_k=2))
    c.train_and_evaluate(args, args.work / "moe", parent)


if __name__ == "__main__":
    sys.exit(main())
