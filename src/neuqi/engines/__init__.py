"""Inference engines we check our files with (llama.cpp today)."""
