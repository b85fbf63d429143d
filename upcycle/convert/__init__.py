"""`upcycle convert`: a dense checkpoint in, a standard Hugging Face MoE checkpoint out (plan, then stream)."""

from upcycle.convert.run import ConvertOptions, ConvertResult, build_plan, convert, exact_claim

__all__ = ["ConvertOptions", "ConvertResult", "build_plan", "convert", "exact_claim"]
