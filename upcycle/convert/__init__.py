"""`upcycle convert`: a dense checkpoint in, a standard Hugging Face MoE checkpoint out (plan, then stream)."""

from upcycle.convert.run import ConvertResult, build_plan, convert, describe, exact_claim

__all__ = ["ConvertResult", "build_plan", "convert", "describe", "exact_claim"]
