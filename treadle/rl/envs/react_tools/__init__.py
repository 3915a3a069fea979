"""ReAct tool use: generated multi-step word problems solved with a Python/calculator tool in the sandbox."""
