"""Runtimes: the one place a model's forward pass runs (torch, ONNX Runtime), behind one interface."""
