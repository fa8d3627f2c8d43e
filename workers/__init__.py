"""CALM workers: run ONNX language models and serve their work streams; nothing about routing."""
