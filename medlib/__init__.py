"""medlib: reproduce and extend Med-Mix / Med-Nirvana (two-stage QLoRA medical LLM).

Importing medlib is cheap: torch, transformers and (above all) unsloth are imported
inside the functions that need them, so `import medlib` works on any machine.
"""

__version__ = "0.1.0"
