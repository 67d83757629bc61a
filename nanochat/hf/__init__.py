"""
The Hugging Face export of a nanochat model: export.py converts (weights, tokenizer, chat template,
model card) and loads an exported directory back; modeling_nanochat.py and configuration_nanochat.py
are copied into every export as the model's remote code (they import transformers; nothing else in
nanochat imports them).
"""
