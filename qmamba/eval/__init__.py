"""Evaluation: perplexity on a text file (`perplexity`); zero-shot tasks live in `tasks`."""

from .perplexity import perplexity, tokenize_text_file, windows

__all__ = ["perplexity", "tokenize_text_file", "windows"]
