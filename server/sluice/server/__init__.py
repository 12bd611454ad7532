"""The Sluice server: settings, model repository, ONNX Runtime sessions and the gRPC services over them."""
