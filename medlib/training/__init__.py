"""Internals of `medlib train`: tokenisation with assistant-only masks, backends, model card.

The public entry points are in `medlib.train` (train, load_recipe_for, load_trained_model).
"""
