"""Fine-grained experts with shared experts (DeepSeekMoE, Qwen1.5-MoE style), written as qwen2_moe.

Each MLP is cut into 4 slices of a quarter width; 16 routed experts are 4 copies of the 4 slices, top-4 chosen,
plus 4 always-on shared slices. The router starts with tied virtual groups so that every token picks one copy
of each slice, and the outputs are scaled so that the sum is the parent MLP exactly (docs/background.md, section 2):

  upcycle convert PARENT moe --granularity 4 --experts 16 --top-k 4 --shared-experts 4 --format qwen2_moe
  upcycle train moe -d DATA -o run --steps 20
"""

import sys

import _common as c
from upcycle.convert import convert


def main(argv=None):
    args = c.options(__doc__, "fine-grained", argv)
    parent = c.parent(args)
    c.print_conversion(convert(parent, args.work / "moe", granularity=4, experts=16, top_k=4, shared_experts=4,
                               format="qwen2_moe"))
    c.train_and_evaluate(args, args.work / "moe", parent)


if __name__ == "__main__":
    sys.exit(main())
