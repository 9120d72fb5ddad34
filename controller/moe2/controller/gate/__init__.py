"""The gate: sentence encoder + MLP head (torch), training on stored scores, ONNX export and
rollout to the gateways."""
