"""Text embedders of the memory: the protocol and registry (``embedders``), the built-in
all-MiniLM-L6-v2 (``minilm``) and its packed batch forward pass (``packed_encoder``)."""
