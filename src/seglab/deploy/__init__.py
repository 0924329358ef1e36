"""Leaving the lab: export (ONNX, TorchScript, torch.export), ONNX Runtime inference,
int8 quantisation, structured pruning, and the size / speed / mIoU report they share."""
