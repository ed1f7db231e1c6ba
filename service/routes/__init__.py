"""HTTP routes: thin handlers that parse, delegate to the engine and shape the answer."""
