"""``compile=True``: the compiled step and the compiled whole loop, plug-ins the engine's loop receives."""
