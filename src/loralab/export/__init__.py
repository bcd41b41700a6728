"""Exports for where people run models: GGUF for llama.cpp, LM Studio and Ollama, and checked adapters for vLLM.

    loralab export --model BASE --adapter runs/x/adapter --format gguf --out model.gguf --quant q8_0
"""
