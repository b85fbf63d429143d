"""Upcycle only every second layer; the others keep their dense MLP (a cheaper MoE; GShard and Switch
put experts in every other layer). Needs a format with mixed layers, e.g. qwen2_moe; auto picks it.

  upcycle convert PARENT moe --experts 8 --top-k 2 --moe-layers every:2
  upcycle train moe -d DATA -o run --steps 20
"""

import sys

import _common as c
from upcycle.convert import convert


def main(argv=None):
    args = c.options(__doc__, "partial-layers", argv)
    parent = c.parent(args)
    c.print_conversion(convert(parent, args.work / "moe", experts=8, top_k=2, moe_layers="every:2"))
    c.train_and_evaluate(args, args.work / "moe", parent)


if __name__ == "__main__":
    sys.exit(main())
