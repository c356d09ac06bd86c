"""KV states: per-module holders, the decode-time cache, tiers, eviction, persistence, prefix reuse."""
