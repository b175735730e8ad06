"""Megatron-core Llama with this project's core attention, and HF checkpoint loading.

Import the modules by name: ``arch`` (a checkpoint's shapes, the padded vocabulary) and ``tiny`` need no
Megatron-core, so the commands that only plan or inspect (``star-mcore plan``, ``config``) start fast;
``llama``, ``core_attention`` and ``hf_checkpoint`` build and load the model.
"""
