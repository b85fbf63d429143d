"""Domain fine-tune of the experts a domain uses most.

1. `upcycle eval --domain` scores general text and domain text and ranks, per layer, the experts the domain
   routes to more than the general text does; it writes domain_experts.json.
2. `upcycle train --train domain_experts.json --train router` then trains only those experts (and the routers),
   leaving the rest of the model as it was. Here the domain is the standard library's email package.

  upcycle eval MOE --data GENERAL --domain DOMAIN --split all -o report
  upcycle train MOE -d DOMAIN -o run --train report/domain_experts.json --train router --steps 20
"""

import sys

import _common as c
from upcycle.core.assets import stdlib_dir
from upcycle.convert import convert
from upcycle.train import train


def main(argv=None):
    args = c.options(__doc__, "domain-finetune", argv)
    parent = c.parent(args)
    domain = [str(stdlib_dir() / "email")]
    moe = args.work / "moe"
    c.print_conversion(convert(parent, moe, experts=8, top_k=2))
    # a freshly upcycled MoE routes at random; a trained one (e.g. 01's run/final) gives a sharper ranking
    c.evaluate(args, moe, None, args.work / "domain-report", domain=domain)
    selection = args.work / "domain-report" / "domain_experts.json"
    run = train(c.train_config(args, moe, args.work / "run", data=domain, train=[str(selection), "router"]))
    c.evaluate(args, run.final, parent, args.work / "report")


if __name__ == "__main__":
    sys.exit(main())
