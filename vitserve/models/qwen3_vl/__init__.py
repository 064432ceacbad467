"""Qwen3-VL (and Qwen3-VL-MoE) vision tower."""
