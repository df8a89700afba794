"""Utilities to train and run LLM preference models for the LMSYS Chatbot Arena competition."""

__version__ = "0.1.0"
