"""The medical chatbot: routing (router), guardrails, the ChatSession API (session) and `medlib chat` (cli).

Heavy imports (torch, transformers) happen inside functions; `from medlib.chat import ChatSession`
stays cheap.
"""

from medlib.chat.session import ChatSession, Reply, run_script

__all__ = ["ChatSession", "Reply", "run_script"]
