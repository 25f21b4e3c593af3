"""rectrain: recommender training with Hydra, Lightning and ONNX export."""
__version__ = "0.1.0"
