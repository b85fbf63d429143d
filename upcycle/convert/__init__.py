"""`upcycle convert`: a dense checkpoint in, a standard Hugging Face MoE checkpoint out (plan, then stream)."""

from upcycle.convert.gguf_out import GGUFResult, convert_gguf
from upcycle.convert.run import ConvertOptions, ConvertResult, build_plan, convert, exact_claim

__all__ = ["ConvertOptions", "ConvertResult", "GGUFResult", "build_plan", "convert", "convert_gguf", "exact_claim"]
