"""HuggingFace integration: load, patch attention, LongLoRA/SinkLoRA recipes, RoPE scaling, export.

Kept light: nothing here imports transformers or peft until a submodule is used.

    from longreach.hf.load import load_hf                 # a local checkpoint, fp32 on CPU / bf16 on GPU
    from longreach.hf.patch import patch_attention       # our masks and context parallelism via the registry
    from longreach.hf.recipes import apply_recipe        # LongLoRA / SinkLoRA / full fine-tuning
    from longreach.hf.rope import RopeScaling            # rope_parameters written the way transformers reads them
    from longreach.hf.export import export_hf            # merge LoRA, save a plain HF checkpoint + tokenizer
"""
