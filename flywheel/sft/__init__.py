"""Supervised fine-tuning: instruction/chat records, loss-masked samples, LoRA adapters.

`records` parses and checks records, `render` turns them into token ids with labels that
cover only the responses, `prepare` splits and writes them with their rejects, `lora`
builds, checks, merges and saves PEFT adapters, `metrics` scores held-out responses and
replies, `demo` builds the local instruction set from this machine's Python docs.
"""
