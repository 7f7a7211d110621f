"""Long-context evaluation: perplexity with LongLoRA's protocol and passkey retrieval (``longreach eval``).

Both run a (patched) HF causal LM on one rank or under context parallelism: a context longer than one
rank holds is sharded with the patch's layout and the same attention path as training.
"""
