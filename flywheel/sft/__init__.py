"""Supervised fine-tuning: instruction/chat records, loss-masked samples, LoRA adapters.

`records` parses and checks records, `render` turns them into token ids with labels that
cover only the responses, `lora` builds, checks, merges and saves PEFT adapters.
"""
