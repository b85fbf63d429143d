"""`upcycle eval`: an MoE against its dense parent on the same held-out tokens, with routing diagnostics.

Modules: stats (intervals, paired comparison), lm (scoring, throughput, memory), cost (parameters, FLOPs),
routing_stats (load, entropy, capacity drops, co-selection), drift (expert weights vs their origin),
specialise (tokens and contexts per expert, domain ranking), runlog (metrics.jsonl), plots, report, run
(the evaluate() entry point).
"""
